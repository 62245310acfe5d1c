"""Generation against transformers 4.57.6 `generate` on tiny random models (f32, eager attention).

Greedy tokens must be identical; the raw logits behind every new token must match both HF's per-step logits
and a full (uncached) forward of the same prefix, ours and HF's.
"""

import numpy as np
import pytest
import torch

import hf_models
import qwen2vl_jax as qv
from qwen2vl_jax import infer

N_NEW = 24
# One torch thread: on a small shared CPU, more threads make the reference many times slower, not faster.
torch.set_num_threads(1)


def _pad_left(rows, pad=0):
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for r, row in enumerate(rows):
        ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
    return ids, mask


def generation_cases(cfg):
    """The issue's four cases, plus a batch whose rows hold different numbers of images."""
    base = hf_models.cases(cfg)
    out = {k: base[k] for k in ("single_image", "two_images", "left_padded_batch")}
    gv = (3, 4, 4)   # T=3 > max(Hm, Wm)=2: the text after the video uses the 4.57 advance (design.md "Position ids")
    out["video"] = dict(input_ids=np.asarray([hf_models.text(3) + hf_models.vision_ids(cfg, gv, video=True)
                                              + hf_models.text(4, 30)]),
                        pixel_values_videos=hf_models.pixels([gv], 7), video_grid_thw=np.asarray([gv]))
    g1, g2, g3 = (1, 4, 4), (1, 2, 2), (1, 6, 8)
    ids, mask = _pad_left([hf_models.text(2) + hf_models.vision_ids(cfg, g1) + hf_models.text(2, 40)
                           + hf_models.vision_ids(cfg, g2) + hf_models.text(3, 50),
                           hf_models.text(5, 60) + hf_models.vision_ids(cfg, g3) + hf_models.text(2, 70)])
    out["images_per_row_differ"] = dict(input_ids=ids, attention_mask=mask, pixel_values=hf_models.pixels([g1, g2, g3], 8),
                                        image_grid_thw=np.asarray([g1, g2, g3]))
    return out


@pytest.fixture(scope="module")
def tiny(hf_checkpoints):
    cfg, hf, path = hf_checkpoints["tiny"]
    return cfg, hf, qv.load_pretrained(path)


def _hf_generate(hf, inputs, **kw):
    kw = {"max_new_tokens": N_NEW, "do_sample": False, "repetition_penalty": 1.0, "pad_token_id": 0, **kw}
    with torch.no_grad():
        out = hf.generate(**hf_models.to_torch(inputs), output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences.numpy(), torch.stack(out.logits, 1).numpy()


def _never_generated(cfg):
    # The vision pad id: a token id the model could emit but that greedy decoding here never does (asserted).
    return cfg.vision_token_id


@pytest.mark.parametrize("case", ["single_image", "two_images", "video", "left_padded_batch", "images_per_row_differ"])
def test_greedy_matches_transformers(tiny, case):
    cfg, hf, ours = tiny
    inputs = generation_cases(cfg)[case]
    eos = _never_generated(cfg)
    ref_seq, ref_logits = _hf_generate(hf, inputs, eos_token_id=eos)
    out = infer.generate(ours, **inputs, max_new_tokens=N_NEW, eos_token_id=eos, return_logits=True)
    assert out.steps == N_NEW and ref_seq.shape[1] == inputs["input_ids"].shape[1] + N_NEW
    np.testing.assert_array_equal(out.sequences, ref_seq)

    err = np.abs(out.logits - ref_logits).max()
    assert err <= 1e-4, f"{case}: decode logits vs HF generate logits {err:.2e}"

    # A full forward of prompt + generated tokens: by causality, position L-1+k holds the logits of the prefix
    # that decode step k saw.
    full = dict(inputs)
    full["input_ids"] = out.sequences.astype(np.int64)
    mask = inputs.get("attention_mask")
    if mask is not None:
        full["attention_mask"] = np.concatenate([mask, np.ones((len(mask), N_NEW), mask.dtype)], 1)
    with torch.no_grad():
        hf_full = hf(**hf_models.to_torch(full)).logits.numpy()[:, -N_NEW - 1:-1]
    # Bucketed like a prompt (left-padded to a shared length) so the cases share compiled shapes.
    rows = infer.generator_for(ours).prepare(**full).batch
    ours_full = np.asarray(ours.packed_logits(rows))[:, -N_NEW - 1:-1]
    for name, ref in (("HF", hf_full), ("our", ours_full)):
        err = np.abs(out.logits - ref).max()
        assert err <= 1e-4, f"{case}: decode logits vs {name} full forward of the prefix {err:.2e}"


def test_several_eos_ids_stop_rows_like_transformers(tiny):
    """Two EOS ids that end the rows of a left-padded batch at different steps: a finished row is padded after
    its EOS and generation stops when the last row ends, exactly as HF."""
    cfg, hf, ours = tiny
    inputs = generation_cases(cfg)["left_padded_batch"]
    L = inputs["input_ids"].shape[1]
    free = ours.generate(**inputs, max_new_tokens=N_NEW, eos_token_id=_never_generated(cfg))[:, L:]
    eos = [int(free[0, 3]), int(free[1, 12])]
    # Greedy tokens up to a row's stop are those of the free run, so each row stops at its first EOS there.
    stops = [int(np.flatnonzero(np.isin(free[r], eos))[0]) for r in range(2)]
    assert stops[0] != stops[1] and max(stops) < N_NEW - 1, "this model's tokens do not give two distinct stops"
    ref_seq, _ = _hf_generate(hf, inputs, eos_token_id=eos)
    got = ours.generate(**inputs, max_new_tokens=N_NEW, eos_token_id=eos)
    np.testing.assert_array_equal(got, ref_seq)
    assert got.shape[1] == L + max(stops) + 1
    for r in range(2):
        assert (got[r, L + stops[r] + 1:] == cfg.pad_token_id).all()


def test_repetition_penalty_matches_transformers(tiny):
    cfg, hf, ours = tiny
    inputs = generation_cases(cfg)["single_image"]
    eos = _never_generated(cfg)
    ref_seq, ref_logits = _hf_generate(hf, inputs, eos_token_id=eos, repetition_penalty=1.3)
    plain, _ = _hf_generate(hf, inputs, eos_token_id=eos)
    assert (ref_seq != plain).any(), "the penalty must change the greedy output for this test to mean anything"
    got = ours.generate(**inputs, max_new_tokens=N_NEW, eos_token_id=eos, repetition_penalty=1.3)
    np.testing.assert_array_equal(got, ref_seq)


def test_sampling_top_k_1_is_greedy_and_seeds_are_reproducible(tiny):
    cfg, _, ours = tiny
    inputs = generation_cases(cfg)["left_padded_batch"]
    eos = _never_generated(cfg)
    kw = dict(max_new_tokens=N_NEW, eos_token_id=eos)
    greedy = ours.generate(**inputs, **kw)
    np.testing.assert_array_equal(ours.generate(**inputs, **kw, do_sample=True, top_k=1, temperature=0.7, seed=3),
                                  greedy)
    a = ours.generate(**inputs, **kw, do_sample=True, top_k=0, seed=1)
    b = ours.generate(**inputs, **kw, do_sample=True, top_k=0, seed=1)
    c = ours.generate(**inputs, **kw, do_sample=True, top_k=0, temperature=1.5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_right_padding_is_refused_with_a_clear_error(tiny):
    cfg, _, ours = tiny
    with pytest.raises(qv.InputError, match="left-padded"):
        ours.generate(np.asarray([[5, 6, 7, 0]]), attention_mask=np.asarray([[1, 1, 1, 0]]), max_new_tokens=2)


# -- logits processors against transformers' own ------------------------------------------------------

def _hf_processed(logits, input_ids, penalty, temperature, top_k, top_p):
    from transformers.generation import logits_process as lp
    procs = [lp.RepetitionPenaltyLogitsProcessor(penalty), lp.TemperatureLogitsWarper(temperature),
             lp.TopKLogitsWarper(top_k), lp.TopPLogitsWarper(top_p)]
    ids, scores = torch.tensor(input_ids), torch.tensor(logits)
    for p in procs:
        scores = p(ids, scores)
    return scores.numpy()


def test_logits_processing_matches_transformers_warpers():
    import jax.numpy as jnp
    from qwen2vl_jax.infer.decode import seen_tokens
    from qwen2vl_jax.infer.sampling import Knobs, Sampler, process
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 64)) * 3).astype(np.float32)
    ids = rng.integers(0, 64, (4, 12))
    cfg = infer.GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    seen = seen_tokens(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), 64)
    got = np.asarray(process(jnp.asarray(logits), seen, Sampler.of(cfg), Knobs.of(cfg)))
    ref = _hf_processed(logits, ids, 1.3, 0.7, 20, 0.8)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    kept = ~np.isinf(ref)
    assert 1 <= kept.sum(-1).min() and kept.sum(-1).max() < 20     # top-p cut inside the top-k survivors
    np.testing.assert_allclose(got[kept], ref[kept], rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampling_follows_the_processed_distribution(top_k):
    """Empirical frequencies of 40k draws against softmax of the HF-processed logits (both code paths:
    full-vocabulary top-p, and top-p inside the top-k candidates)."""
    import jax
    import jax.numpy as jnp
    from qwen2vl_jax.infer.sampling import Knobs, Sampler, next_token
    logits = np.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]], np.float32)
    cfg = infer.GenerationConfig(do_sample=True, temperature=0.8, top_k=top_k, top_p=0.9)
    ref = _hf_processed(logits, np.zeros((1, 1), np.int64), 1.0, 0.8, top_k or 8, 0.9)[0]
    probs = np.exp(ref - ref.max())
    probs /= probs.sum()
    draw = jax.jit(jax.vmap(lambda k: next_token(jnp.asarray(logits), None, k, Sampler.of(cfg), Knobs.of(cfg))[0]))
    n = 40000
    freq = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), n))), minlength=8) / n
    assert (freq[probs == 0] == 0).all(), "sampled a token that top-k/top-p removed"
    # 40k draws: binomial standard error <= 0.0025, so 0.01 is four standard errors.
    np.testing.assert_allclose(freq, probs, atol=0.01)


# -- on a mesh --------------------------------------------------------------------------------------

MESH_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
import jax, hf_models, test_generate, qwen2vl_jax as qv
from jax.sharding import PartitionSpec as P
from qwen2vl_jax import infer
from qwen2vl_jax.sharding import make_mesh
assert jax.device_count() == 8
cfg = qv.Qwen2VLConfig.from_pretrained({path!r})
sharded = qv.load_pretrained({path!r}, mesh=make_mesh(data=2, fsdp=2, tensor=2))
plain = qv.load_pretrained({path!r})
inputs = test_generate.generation_cases(cfg)["images_per_row_differ"]   # 2 rows -> padded to the 4 batch shards
kw = dict(max_new_tokens=8, eos_token_id=cfg.vision_token_id, return_logits=True)
a, b = infer.generate(sharded, **inputs, **kw), infer.generate(plain, **inputs, **kw)
np.testing.assert_array_equal(a.sequences, b.sequences)
np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
gen = infer.generator_for(sharded)
assert gen.batch_multiple == 4
prompt = gen.prepare(**inputs)
_, cache, _, _ = gen.start(sharded.params, prompt, infer.GenerationConfig(max_new_tokens=8))
k = cache[0]                                           # (layers, B, S, Hkv, Dh)
assert k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor"), k.sharding.spec
assert {{s.data.shape for s in k.addressable_shards}} == {{(k.shape[0], 1, k.shape[2], 1, k.shape[4])}}
print("OK")
"""


@pytest.mark.slow   # a fresh 8-device process compiles everything again (~30 s on 2 cores)
def test_generate_on_a_mesh_matches_one_device(hf_checkpoints):
    """(data 2, fsdp 2, tensor 2) on 8 simulated CPU devices: batch rows and KV heads split, same tokens."""
    import os
    import subprocess
    import sys
    _, _, path = hf_checkpoints["tiny"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = MESH_SCRIPT.format(tests=os.path.dirname(__file__), path=path)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
