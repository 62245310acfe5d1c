import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (the `tpu` extra: the TPU compiler the compile_for tests run on this CPU) looks for a TPU at start-up.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def _saved_hf_models(tmp_path_factory, configs: dict, build, prefix: str, seed: int) -> dict:
    """name -> (our config, HF torch model, checkpoint dir): each config's tiny random reference model, saved."""
    out = {}
    for name, make in configs.items():
        cfg = make()
        model = build(cfg, seed=seed + len(out))
        path = str(tmp_path_factory.mktemp(f"{prefix}_{name}"))
        model.save_pretrained(path)
        out[name] = (cfg, model, path)
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """The two tiny Qwen2-VL reference shapes."""
    import hf_models
    return _saved_hf_models(tmp_path_factory, hf_models.CONFIGS, hf_models.build_hf, "hf", 0)


@pytest.fixture(scope="session")
def hf_checkpoints_2_5(tmp_path_factory):
    """The tiny Qwen2.5-VL reference shapes."""
    import hf_models
    return _saved_hf_models(tmp_path_factory, hf_models.CONFIGS_2_5, hf_models.build_hf, "hf25", 10)


@pytest.fixture(scope="session")
def hf_checkpoints_3(tmp_path_factory):
    """The tiny Qwen3-VL reference shapes."""
    import hf_models
    return _saved_hf_models(tmp_path_factory, hf_models.CONFIGS_3, hf_models.build_hf_3, "hf3", 20)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A running GCS emulator (tests/gcs.py) that this process and its subprocesses use for gs:// paths. A
    missing binary fails the tests that need it: the cloud paths are part of what the project ships."""
    import gcs as gcs_lib
    server = gcs_lib.FakeGCS(str(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"))
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(gcs, request):
    """A fresh bucket for one test: gs://<name>."""
    import re
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid()}"
    return gcs.create_bucket(name)


def pytest_configure(config):
    # GPUs run f32 matmuls in TF32 by default (about 1e-3 relative); the parity tests hold f32 to 1e-5.
    import jax
    if jax.default_backend() == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
