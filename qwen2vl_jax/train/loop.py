"""The training run behind `train.py`: mesh -> model and optimizer -> data -> init or resume -> jitted step ->
loop with NaN guard, async checkpoints, metrics and a clean stop on SIGTERM / preemption -> HF export.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flax.linen as nn

from qwen2vl_jax import api, hf, lora, peft_io, sharding, storage
from qwen2vl_jax.config import PRESETS, Qwen2VLConfig, preset
from qwen2vl_jax.data import DataError
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import batches, checkpoint, metrics, optim
from qwen2vl_jax.train import data as data_lib
from qwen2vl_jax.train.config import RunConfig, adapter as run_adapter, param_groups
from qwen2vl_jax.train.state import abstract_state, init_state, param_shardings, state_shardings
from qwen2vl_jax.train.step import StepFn


class TrainingStopped(RuntimeError):
    """The run stopped on its own: a non-finite loss, or a config that contradicts the workdir."""


# -- where the model comes from ----------------------------------------------------------------------------

def _is_orbax(path: str) -> bool:
    try:
        checkpoint.step_dir(path)
        return True
    except FileNotFoundError:
        return False


def model_config(cfg: RunConfig) -> Qwen2VLConfig:
    """`init_from`'s config when given (an HF dir or an orbax checkpoint), else the `model` preset / HF dir."""
    if cfg.init_from:
        if _is_orbax(cfg.init_from):
            return checkpoint.read_model_config(cfg.init_from)
        return Qwen2VLConfig.from_pretrained(cfg.init_from)
    if cfg.model.lower() in PRESETS:
        return preset(cfg.model)
    return Qwen2VLConfig.from_pretrained(cfg.model)


def initial_params(cfg: RunConfig, config: Qwen2VLConfig, shardings, log) -> dict | None:
    """Params to start from, placed in `shardings`, or None for a random init."""
    if cfg.init_from:
        if _is_orbax(cfg.init_from):
            log(f"init: params of the orbax checkpoint {checkpoint.step_dir(cfg.init_from)}")
            return checkpoint.restore_params(cfg.init_from, shardings=shardings)[1]
        log(f"init: HF checkpoint {cfg.init_from}")
        return hf.load_params(cfg.init_from, config, dtype=np.float32, shardings=shardings)
    if cfg.init.vision:
        from qwen2vl_jax.assemble import assemble_params   # stage 1 from a CLIP ViT + a Qwen2 LLM
        params, report = assemble_params(config, vision=cfg.init.vision, llm=cfg.init.llm, seed=cfg.seed,
                                         shardings=shardings)
        if jax.process_index() == 0:
            report.save(cfg.workdir)
        log(report.to_text())
        return params
    return None


def adapted_params(cfg: RunConfig, config: Qwen2VLConfig, base_module, adapter, shardings, mesh, log):
    """The params of a LoRA run placed in `shardings.params`: the base (as `initial_params` gives it, or a
    random init when it gives none), quantised / cast, with fresh adapters, or those of `lora.init_adapter`."""
    base_sh = param_shardings(base_module, mesh)
    params = initial_params(cfg, config, base_sh, log)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0x10AA)
    if params is None:
        dummy = api.dummy_batch(config)
        params = jax.jit(lambda k: nn.meta.unbox(base_module.init(k, dummy)["params"]), out_shardings=base_sh)(
            jax.random.split(jax.random.key(cfg.seed))[0])
    params = jax.jit(lambda p: lora.build(p, adapter, key), out_shardings=shardings.params)(params)
    if cfg.lora.init_adapter:
        loaded, host = peft_io.load_adapter(cfg.lora.init_adapter, config, jax.device_get(params))
        if (loaded.r, loaded.alpha, loaded.rslora) != (adapter.r, adapter.alpha, adapter.rslora):
            raise TrainingStopped(f"{cfg.lora.init_adapter}: its adapter has r={loaded.r}, alpha={loaded.alpha}, "
                                  f"rslora={loaded.rslora}; set lora.r, lora.alpha and lora.rslora to match")
        params = jax.device_put(host, shardings.params)
        log(f"init: adapter {cfg.lora.init_adapter}")
    return params


def resolve_dtype(cfg: RunConfig) -> RunConfig:
    """`dtype: auto`: bfloat16 where the matrix units are built for it (TPU, GPU), float32 on a CPU, where
    bfloat16 is emulated and slower."""
    if cfg.dtype != "auto":
        return cfg
    return dataclasses.replace(cfg, dtype="float32" if jax.default_backend() == "cpu" else "bfloat16")


# -- stopping cleanly ----------------------------------------------------------------------------------------

class StopRequest:
    """SIGTERM (preemption) or a first Ctrl-C asks the loop to save and stop after the current step; a second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.reason: str | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: the caller handles signals
                pass

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _last_checkpoint(workdir: str) -> str:
    try:
        return f"the last committed checkpoint is intact: {checkpoint.step_dir(workdir)}"
    except FileNotFoundError:
        return f"no checkpoint was committed in {workdir}"
    except Exception as e:   # the watcher must say something even when the workdir cannot be read
        return f"the checkpoints in {workdir} could not be listed ({type(e).__name__})"


# -- the step a run builds ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
    module: Qwen2VLModule
    tx: Any
    parts: tuple
    shardings: Any       # TrainState of NamedShardings
    step_fn: StepFn
    base_module: Qwen2VLModule   # the module without adapters (== module when the run has none)
    adapter: Any                 # the run's LoRA settings, or None


def build(cfg: RunConfig, config: Qwen2VLConfig, mesh) -> Built:
    """The module, optimizer, state shardings and jitted step of a run (`cfg.dtype` resolved): what `run`
    trains with and what `compile_for` compiles for a TPU slice, so the two cannot drift apart."""
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    base_module = Qwen2VLModule(config, dtype=dtype, param_dtype=jnp.float32, remat=cfg.remat,
                                attn_impl=cfg.attn_impl)
    adapter = run_adapter(cfg)
    module = lora.adapted(base_module, adapter)
    parts = param_groups(cfg)
    tx = optim.make_optimizer(cfg.optim, parts)
    schedules = optim.schedules(cfg.optim, parts)
    shardings = state_shardings(module, tx, parts, mesh)
    step_fn = StepFn(mesh, shardings, module=module, tx=tx, parts=parts, schedules=schedules,
                     z_loss=cfg.z_loss, loss_chunk=cfg.loss_chunk, max_segment_len=cfg.max_segment_len)
    return Built(module, tx, parts, shardings, step_fn, base_module, adapter)


# -- the start-up ----------------------------------------------------------------------------------------------

START_ERRORS = {**data_lib.START_ERRORS, "TrainingStopped": TrainingStopped}


def exit_code(kind: str) -> int:
    """train.py's exit code for a start-up verdict of error kind `kind`: 2 for a config, data, storage or
    checkpoint error (the line says what to fix), 1 for a stop or an unexpected exception."""
    return 2 if kind in data_lib.START_ERRORS else 1


def start_error(e: Exception) -> Exception:
    """A file that is missing or unreadable at start-up (an `init_from`, a tokenizer, a checkpoint) is a
    storage error (exit 2, one line naming it), not a crash."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) and \
            not isinstance(e, storage.StorageError):
        err = storage.StorageError(sharding.one_line(e))
        err.__cause__ = e
        return err
    return e


def _start(cfg: RunConfig, data: Any):
    """Mesh, data check, model, optimizer, checkpoints and the initial or restored state. Every host passes
    the same agreement points (`sharding.agree`) before each step that may run a collective: the first host
    that fails is the one every host names."""
    storage.require_bucket(cfg.workdir)   # a clear error now, not one from deep inside orbax later
    if cfg.compile_cache:
        jax.config.update("jax_compilation_cache_dir", cfg.compile_cache)
    main = jax.process_index() == 0
    log = (lambda s: print(s, flush=True)) if main else (lambda s: None)
    mesh = sharding.mesh_from_config(cfg.mesh)
    batches.check_rows(cfg.data.batch_size, mesh)
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].device_kind} devices, "
        f"{jax.process_count()} process(es)")

    # -- the data's records, checked before anything is built or compiled
    config = model_config(cfg)
    if data is None:
        cfg = data_lib.check(cfg, config, mesh, log)

    # -- model and optimizer
    cfg = resolve_dtype(cfg)
    built = build(cfg, config, mesh)
    module, tx, parts, shardings = built.module, built.tx, built.parts, built.shardings
    base_module, adapter = built.base_module, built.adapter
    sharding.agree("model", None, START_ERRORS)   # before orbax's first barrier

    # -- checkpoints: resume from the workdir, or start
    storage.makedirs(cfg.workdir)
    ckpts = checkpoint.Checkpoints(cfg.workdir, cfg.keep_checkpoints)
    latest = ckpts.latest_step()
    own_data = data is None
    layout = data_lib.layout(cfg, mesh) if own_data else {}
    seed_offset, data_state = 0, None
    if latest is not None:
        saved = checkpoint.read_model_config(ckpts.directory)
        if saved != config:
            raise TrainingStopped(f"{cfg.workdir} holds checkpoints of a different model than this config "
                                  "describes; use a new workdir (or the config that made them)")
    # every host must resume the same step: a workdir that is not one shared storage differs here
    sharding.agree_values("checkpoint", str(latest), lambda i, mine, first: (
        f"sees {'no checkpoint' if mine == 'None' else 'checkpoint step ' + mine} in {ckpts.directory} where host 0 "
        f"sees {'none' if first == 'None' else 'step ' + first}; the workdir must be one storage all hosts share "
        "(a bucket or a shared filesystem)"), START_ERRORS)
    if latest is not None:
        target = abstract_state(module, tx, parts, shardings)
        if adapter is not None:   # LoRA checkpoints hold the trained params only; the base is rebuilt
            target = target.replace(params=optim.split(target.params, parts)[0])
        state, saved_data = ckpts.restore(target, latest)
        if adapter is not None:
            base = init_state(module, tx, parts, shardings, cfg.seed,
                              adapted_params(cfg, config, base_module, adapter, shardings, mesh, log))
            state = state.replace(params=optim.merge(state.params, optim.split(base.params, parts)[1]))
        if saved_data is not None and saved_data["layout"] == layout:
            seed_offset, data_state = saved_data["seed_offset"], saved_data["state"]
        else:
            log(f"warning: the data layout changed since step {latest} (hosts, rows, buckets, files or seed), so "
                "its iterator state does not fit: the data restarts, reshuffled with seed + step")
            seed_offset = latest
        log(f"resumed from {ckpts.directory}/{latest}")
    else:
        if adapter is None:
            params = initial_params(cfg, config, shardings.params, log)
        else:
            params = adapted_params(cfg, config, base_module, adapter, shardings, mesh, log)
        state = init_state(module, tx, parts, shardings, cfg.seed, params)
    if own_data:
        data = data_lib.make_source(cfg, config, mesh, seed_offset)
    if data_state is not None:
        data.set_state(data_state)
    sharding.agree("start-up", None, START_ERRORS)   # every host is ready for the first step
    return cfg, config, built, ckpts, state, data, layout, seed_offset, latest


# -- the run ---------------------------------------------------------------------------------------------------

def run(cfg: RunConfig, data: Any = None) -> dict:
    """Train as `cfg` says; returns a summary (first/last loss, steps, wall time, throughput).

    `data`: an iterator of packed numpy batches with `get_state()` / `set_state()`; default: the pipeline
    that `cfg.data` describes.
    """
    t_start = time.perf_counter()
    # -- devices: before anything touches one
    sharding.initialize_distributed()
    # a lost host ends the others in one line; so does another host's start-up verdict while this one waits
    # inside a collective that host never joins
    watch = sharding.watch(lambda: _last_checkpoint(cfg.workdir), exit_code)
    try:   # the start-up: any error on any host ends every host with the same line (sharding.agree / fail)
        cfg, config, built, ckpts, state, data, layout, seed_offset, latest = _start(cfg, data)
    except Exception as e:
        sharding.fail(start_error(e), START_ERRORS)
    module, tx, parts, shardings, step_fn = built.module, built.tx, built.parts, built.shardings, built.step_fn
    base_module, adapter = built.base_module, built.adapter
    main = jax.process_index() == 0
    log = (lambda s: print(s, flush=True)) if main else (lambda s: None)
    start = int(jax.device_get(state.step))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_train = sum(x.size for x in jax.tree.leaves(optim.split(state.params, parts)[0]))
    log(f"model {cfg.model if not cfg.init_from else cfg.init_from}: {n_params:,} params, {n_train:,} trainable "
        f"({', '.join(parts.trained)}); compute {cfg.dtype}, remat {cfg.remat}, attention {cfg.attn_impl}")

    peak = metrics.peak_flops(jax.devices()[0].device_kind, cfg.peak_tflops)
    run_record = {**cfg.to_dict(), "trainable_parts": list(parts.trained)}

    # -- loop
    log_file = metrics.MetricsLog(cfg.workdir, resume_step=start, enabled=main)
    progress = metrics.Progress(cfg.steps, start, enabled=main and cfg.progress)
    stop = StopRequest()
    timer = metrics.StepTimer()
    summary: dict = {"start_step": start, "losses": []}
    nan_run = [0]
    last_saved = latest

    def finish(pending):
        """Fetch a dispatched step's metrics: NaN guard, logging."""
        step, dev_metrics, host = pending
        m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
        dt = timer.lap()
        if not m.pop("finite"):
            nan_run[0] += 1
            what = f"step {step}: loss {m['loss']} / gradient norm {m['grad_norm']} is not finite"
            if cfg.on_nan == "stop" or nan_run[0] > cfg.max_nan_skips:
                ckpts.wait()
                saved = "no checkpoint was written" if last_saved is None else \
                    f"the last checkpoint is step {last_saved}"
                raise TrainingStopped(
                    f"{what} ({nan_run[0]} bad step(s) in a row); the update was not applied and {saved}. "
                    "Lower optim.lr or raise optim.warmup_steps, look at that step's data, or set on_nan=skip "
                    "(with max_nan_skips) to step over rare bad batches")
            progress.write(f"{what}; update skipped ({nan_run[0]} in a row)")
        else:
            nan_run[0] = 0
        m.update(step_time=dt, data_time=host["data_time"], text_tokens=host["text_tokens"],
                 patches=host["patches"], tokens_per_s=host["text_tokens"] / dt,
                 tflops_per_device=host["flops"] / dt / jax.device_count() / 1e12, **host["seen"])
        if peak:
            m["mfu"] = host["flops"] / dt / jax.device_count() / peak
        summary["losses"].append((step, m["loss"]))
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_file.write(step, m)
        progress.update(step, m["loss"], m["tokens_per_s"], dt)
        return m

    def data_snapshot():   # this host's iterator state, with what it depends on
        return {"layout": layout, "seed_offset": seed_offset, "state": data.get_state()}

    def saved(st):   # what a checkpoint holds: with adapters, the trained params only
        return st if adapter is None else st.replace(params=optim.split(st.params, parts)[0])

    pending, step, it = None, start, iter(data)
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            try:
                host_batch = batches.stack_micro_batches([next(it) for _ in range(cfg.grad_accum)])
            except (DataError, storage.StorageError) as e:
                # a bad record past the budget or an unreadable file on this host, while the others wait for it
                # in the step's collectives: every host ends with this host's line (their HostWatch, a
                # heartbeat later), not with a "stopped responding" one 30 s later
                sharding.fail(e, START_ERRORS)
            except StopIteration:
                step -= 1
                log(f"\nthe data ran out after step {step}")
                summary["stopped"] = "data exhausted"
                if last_saved != step:
                    if pending is not None:
                        finish(pending)
                        pending = None
                    log_file.flush()   # metrics up to a checkpoint survive with it (buckets upload on flush)
                    ckpts.save(saved(state), step, data_snapshot(), config, run_record)
                    last_saved = step
                break
            host = {"data_time": time.perf_counter() - t0,
                    "text_tokens": float((host_batch["segment_ids"] > 0).sum()),
                    "patches": float((host_batch["patch_segment_ids"] > 0).sum())
                    if "patch_segment_ids" in host_batch else 0.0,
                    "flops": metrics.step_flops(config, host_batch, parts.parts()),
                    # examples read so far per mixture component, so a run shows what the model has seen
                    "seen": {f"seen/{k}": float(v) for k, v in getattr(data, "seen", {}).items()}}
            device_batch = batches.to_device(host_batch, step_fn.batch_shardings(host_batch))
            state, dev_metrics = step_fn(state, device_batch)
            if pending is not None:
                finish(pending)
            pending = (step, dev_metrics, host)
            preempted = ckpts.reached_preemption(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop.reason or preempted:
                finish(pending)   # a step is saved only after its NaN check
                pending = None
                log_file.flush()
                ckpts.save(saved(state), step, data_snapshot(), config, run_record)
                last_saved = step
            if stop.reason or preempted:
                log(f"\nstopping after step {step} ({stop.reason or 'preemption'}): checkpoint saved")
                summary["stopped"] = stop.reason or "preemption"
                break
        if pending is not None:
            finish(pending)
        ckpts.wait()
    finally:
        stop.restore()
        progress.close()
        log_file.close()
        if hasattr(data, "close"):
            data.close()

    # -- export
    if adapter is not None and step == cfg.steps and "stopped" not in summary:
        out = storage.join(cfg.workdir, "adapter")
        if main:
            peft_io.save_adapter(jax.device_get(optim.split(state.params, parts)[0]), config, adapter, out,
                                 cfg.lora.init_adapter or cfg.init_from)
        log(f"exported the adapter (peft) to {out}")
    if adapter is not None and cfg.lora.export_merged and step == cfg.steps and "stopped" not in summary:
        out = storage.join(cfg.workdir, "hf")
        merged = jax.jit(lambda p: lora.merge(p, adapter))(state.params)
        checkpoint.export_hf(merged, config, out, cfg.export_dtype, processor=data_lib.processor(cfg, config),
                             generation=data_lib.generation(cfg))
        log(f"exported the merged HF checkpoint to {out}")
    elif adapter is None and cfg.export_hf and step == cfg.steps and "stopped" not in summary:
        out = storage.join(cfg.workdir, "hf")
        checkpoint.export_hf(state.params, config, out, cfg.export_dtype, processor=data_lib.processor(cfg, config),
                             generation=data_lib.generation(cfg))
        log(f"exported the HF checkpoint to {out}")
    ckpts.close()
    watch.done()
    losses = [l for _, l in summary.pop("losses")]
    summary.update(end_step=step, wall_time=time.perf_counter() - t_start,
                   loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
                   loss_first10_mean=float(np.mean(losses[:10])) if losses else None,
                   loss_last10_mean=float(np.mean(losses[-10:])) if losses else None)
    return summary
