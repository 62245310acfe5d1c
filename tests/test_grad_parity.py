"""The loss and every parameter's gradient against torch autograd of transformers 4.57.6, for both families
(Qwen2-VL and Qwen2.5-VL), on images, a video (with an image) and a left-padded batch; tied and untied heads.

Our side is the train step's own loss (`forward_sums`: next-token cross-entropy summed over target tokens,
divided by their count); the reference's is `model(**inputs, labels=...).loss`, the same mean. The reference's
gradients are mapped to our layout by the family's HF key table, the one the loader uses.
"""

import jax
import numpy as np
import pytest
import torch

import hf_models
from qwen2vl_jax import hf as hf_io
from qwen2vl_jax.inputs import batch_from_hf
from qwen2vl_jax.train.step import forward_sums

CASES = ["two_images", "video_and_image", "left_padded_batch"]


def _labels(cfg, inputs):
    """HF labels: the tokens, -100 on padding, on vision pad tokens and on each row's first real token (which
    a padding slot would otherwise be asked to predict)."""
    ids = np.asarray(inputs["input_ids"]).reshape(-1, np.shape(inputs["input_ids"])[-1])
    mask = inputs.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    after_pad = np.concatenate([np.ones((len(ids), 1), bool), mask[:, :-1] == 0], axis=1)
    bad = (mask == 0) | after_pad | (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    return np.where(bad, -100, ids).astype(np.int64)


def _ours(cfg, model, inputs, labels):
    batch, _ = batch_from_hf(cfg, **inputs)
    # Position t predicts token t + 1: the shifted labels the data pipeline writes.
    shifted = np.concatenate([labels[:, 1:], np.full((len(labels), 1), -100)], axis=1)
    batch["labels"] = np.maximum(shifted, 0).astype(np.int32)
    batch["loss_mask"] = (shifted != -100).astype(np.float32)
    n = batch["loss_mask"].sum()

    def loss(params):
        return forward_sums(model.module, params, batch).ce / n
    value, grads = jax.jit(jax.value_and_grad(loss))(model.params)
    return float(value), hf_io._flatten(jax.device_get(grads))


def _reference(cfg, model, inputs, labels):
    model.zero_grad()
    out = model(**hf_models.to_torch(inputs), labels=torch.from_numpy(labels))
    out.loss.backward()
    grads = {hf_io._canonical(name): p.grad.numpy() for name, p in model.named_parameters()}
    mapped = {}
    for ours, (name, n, to_ours, _) in hf_io.param_map(cfg).items():
        one = [to_ours(grads[name.format(i=i)]) for i in range(n)] if n else to_ours(grads[name])
        mapped[ours] = np.stack(one) if n else one
    return float(out.loss.detach()), mapped


def _check(cfg, hf, ours, case_inputs, label):
    labels = _labels(cfg, case_inputs)
    loss, grads = _ours(cfg, ours, case_inputs, labels)
    ref_loss, ref_grads = _reference(cfg, hf, case_inputs, labels)
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), f"{label}: loss {loss} vs {ref_loss}"
    assert set(grads) == set(ref_grads)
    worst = []
    for path, g in grads.items():
        r = ref_grads[path]
        assert g.shape == r.shape, f"{label} {'/'.join(path)}: {g.shape} vs {r.shape}"
        scale = float(np.abs(r).max())
        err = float(np.abs(g - r).max())
        worst.append((err / max(scale, 1e-12), "/".join(path), err, scale))
        # Gradients of f32 models through ~20 ops: 1e-4 of the leaf's largest entry (and never above 1e-6
        # absolute for a leaf whose gradient is all but zero).
        assert err <= 1e-4 * scale + 1e-7, f"{label} {'/'.join(path)}: max |grad diff| {err:.2e}, max |grad| {scale:.2e}"
    assert max(w[3] for w in worst) > 0   # the gradients are not all zero


@pytest.fixture(scope="module")
def loaded(hf_checkpoints, hf_checkpoints_2_5):
    import qwen2vl_jax as qv
    both = {**hf_checkpoints, **hf_checkpoints_2_5}
    return {name: (cfg, hf, qv.load_pretrained(path)) for name, (cfg, hf, path) in both.items()
            if name in ("tiny", "tied", "w56_mid", "w84_first_tied")}


SLOW = pytest.mark.slow


@pytest.mark.parametrize("shape,case", [("tiny", "video_and_image"), ("tiny", "left_padded_batch"),
                                        pytest.param("tiny", "two_images", marks=SLOW)]
                         + [pytest.param("tied", c, marks=SLOW) for c in CASES])
def test_qwen2_vl_gradients_match_autograd(loaded, shape, case):
    cfg, hf, ours = loaded[shape]
    _check(cfg, hf, ours, hf_models.cases(cfg)[case], f"{shape}/{case}")


CASES_2_5 = CASES + ["edge_windows", "left_padded_mixed"]


@pytest.mark.parametrize("shape,case", [("w56_mid", c) for c in ("edge_windows", "left_padded_mixed")]
                         + [pytest.param("w56_mid", c, marks=SLOW)
                            for c in ("two_images", "video_and_image", "left_padded_batch")]
                         + [pytest.param("w84_first_tied", c, marks=SLOW) for c in CASES_2_5])
def test_qwen2_5_vl_gradients_match_autograd(loaded, shape, case):
    cfg, hf, ours = loaded[shape]
    _check(cfg, hf, ours, hf_models.cases_2_5(cfg)[case], f"{shape}/{case}")
