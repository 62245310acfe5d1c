"""Loading an HF checkpoint straight onto a (data 2, fsdp 2, tensor 2) mesh of 8 simulated CPU devices."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys, numpy as np
    sys.path.insert(0, {tests!r})
    import jax, hf_models, qwen2vl_jax as qv
    from qwen2vl_jax.sharding import make_mesh
    assert jax.device_count() == 8
    path = {path!r}
    cfg = qv.Qwen2VLConfig.from_pretrained(path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = qv.load_pretrained(path, mesh=mesh)
    plain = qv.load_pretrained(path)
    q = sharded.params["model"]["layers"]["q_proj"]["kernel"]       # (layers, embed, heads)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding.spec
    shard_shapes = {{s.data.shape for s in q.addressable_shards}}
    assert shard_shapes == {{(q.shape[0], q.shape[1] // 2, q.shape[2] // 2)}}, shard_shapes
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    inputs = hf_models.cases(cfg)["two_images"]
    np.testing.assert_allclose(np.asarray(sharded(**inputs)), np.asarray(plain(**inputs)), atol=1e-5, rtol=0)
    print("OK")
""")


def test_load_onto_mesh(hf_checkpoints, tmp_path):
    _, _, path = hf_checkpoints["tiny"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = SCRIPT.format(tests=os.path.dirname(__file__), path=path)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
