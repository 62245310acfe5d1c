"""train.py with `lora:` on a tiny HF checkpoint: a run stopped and resumed ends bit-identical to one that went
straight through, its checkpoints hold the adapters and the step state only, and the adapter it exports loads
in peft (and here) with the logits of its merged export."""

import copy

import numpy as np
import pytest
import torch

import hf_models
import qwen2vl_jax as qv
from qwen2vl_jax import api, lora
from qwen2vl_jax.train import checkpoint as ck
from qwen2vl_jax.train.config import load
from qwen2vl_jax.train.loop import run

pytestmark = pytest.mark.slow   # three short training runs


def _cfg(workdir, shared, init_from, steps, *extra):
    return load(None, [f"workdir={workdir}", f"steps={steps}", f"init_from={init_from}", "checkpoint_every=3",
                       "progress=false", f"data.synthetic_dir={shared}/synthetic", "data.synthetic_size=80",
                       "data.batch_size=2", "data.window=8", "optim.warmup_steps=1", "optim.lr=1e-2",
                       "lora.r=4", "lora.alpha=8", "lora.quant=int8", "lora.export_merged=true",
                       "lora.targets=^(model/layers/(q|v|down)_proj|visual/blocks/qkv|visual/merger/mlp_0)$",
                       *extra])


def test_lora_resume_checkpoint_and_peft_export(tmp_path, hf_checkpoints):
    cfg, hf_model, path = hf_checkpoints["tiny"]
    shared = tmp_path / "shared"
    s1 = run(_cfg(tmp_path / "straight", shared, path, 6))
    assert s1["loss_last"] < s1["loss_first"]
    run(_cfg(tmp_path / "resumed", shared, path, 3))
    s2 = run(_cfg(tmp_path / "resumed", shared, path, 6))
    assert s2["start_step"] == 3
    a = (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b   # bit-identical adapters

    # The checkpoint holds the trained params only: the adapters (the int8 base is rebuilt from init_from).
    _, params = ck.restore_params(str(tmp_path / "straight" / "checkpoints"))
    import jax
    leaves = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert leaves and all(x.endswith(("lora_a", "lora_b")) for x in leaves)

    # The exported adapter in peft = here = the merged export (dequantised int8 base + adapters folded in).
    from peft import PeftModel
    inputs = hf_models.cases(cfg)["two_images"]
    merged = qv.load_pretrained(str(tmp_path / "straight" / "hf"))
    ours_merged = np.asarray(merged(**inputs))
    # peft runs over the f32 base, the run trained over its int8 copy: compare peft with our adapter on the
    # same f32 base (unmerged), and the merged export with that adapter on the int8 base.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "straight" / "adapter")).eval()
    with torch.no_grad():
        ref = peft_model(**hf_models.to_torch(inputs)).logits.numpy()
    ours = qv.load_pretrained(path, adapter=str(tmp_path / "straight" / "adapter"), base_quant="none")
    np.testing.assert_allclose(np.asarray(ours(**inputs)), ref, rtol=0, atol=1e-4)
    # By default the adapter's base_quant.json (lora.quant of the run) quantises the base as the run did:
    # the merged export's model.
    trained = qv.load_pretrained(path, adapter=str(tmp_path / "straight" / "adapter"))
    assert trained.adapter.quant == "int8" and "kernel_q" in trained.params["model"]["layers"]["q_proj"]
    np.testing.assert_allclose(np.asarray(trained(**inputs)), ours_merged, rtol=0, atol=1e-4)
    base = qv.load_pretrained(path)
    assert np.abs(ref - np.asarray(base(**inputs))).max() > 1e-3          # the adapter learnt something

    # eval.py on the run's checkpoint (adapters only) evaluates with them, over the int8 base the run rebuilt:
    # the merged export's model (its logits), not the base, and the same answers as the export.
    from qwen2vl_jax.data import synthetic
    from test_eval_cli import _cli, _predictions
    cli = _cli()
    step_dir, _, run_cfg = cli.find_checkpoint(cli.load_config(None, [f"checkpoint={tmp_path / 'straight'}"]))
    evaluated = cli.load_model(cli.load_config(None, []), step_dir, run_cfg)
    assert evaluated.adapter is not None and evaluated.adapter.quant == "int8"
    np.testing.assert_allclose(np.asarray(evaluated(**inputs)), ours_merged, rtol=0, atol=1e-4)
    common = ["--data", synthetic.heldout_path(str(shared / "synthetic")), "limit=6", "batch_size=3",
              "max_new_tokens=4", "progress=false"]
    cli.run(["--checkpoint", str(tmp_path / "straight"), *common, f"out={tmp_path / 'e_run'}"])
    cli.run(["--checkpoint", str(tmp_path / "straight" / "hf"), *common, f"out={tmp_path / 'e_merged'}"])
    assert _predictions(tmp_path / "e_run") == _predictions(tmp_path / "e_merged")
    q = base.add_adapter(lora.Adapter(r=4, alpha=8, quant="int8", targets=ours.adapter.targets, base_dtype="bfloat16"))
    np.testing.assert_allclose(ours_merged, np.asarray(_with_adapters(q, ours)(**inputs)), rtol=0, atol=1e-4)


def _with_adapters(q, ours):
    """q (the int8 base) carrying the adapters of `ours`."""
    from qwen2vl_jax import lora
    params = q.params
    for mod in lora.dense_modules(ours.params):
        layer = lora._at(ours.params, mod)
        if "lora_a" in layer:
            params = lora._replace(params, mod, lambda l, s=layer: {**l, "lora_a": s["lora_a"], "lora_b": s["lora_b"]})
    return api.Qwen2VL(q.config, params, adapter=q.adapter)
