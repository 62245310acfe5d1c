import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (our config, HF torch model, checkpoint dir) for the two tiny reference shapes."""
    import hf_models
    out = {}
    for name, make in hf_models.CONFIGS.items():
        cfg = make()
        model = hf_models.build_hf(cfg, seed=len(out))
        path = str(tmp_path_factory.mktemp(f"hf_{name}"))
        model.save_pretrained(path)
        out[name] = (cfg, model, path)
    return out


def pytest_configure(config):
    # GPUs run f32 matmuls in TF32 by default (about 1e-3 relative); the parity tests hold f32 to 1e-5.
    import jax
    if jax.default_backend() == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
