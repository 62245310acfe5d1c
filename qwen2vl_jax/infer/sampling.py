"""Next-token choice: the logits processors of transformers' `generate`, in its order, on the device.

Order (transformers 4.57 `_get_logits_processor`): repetition penalty, then, when sampling, temperature,
top-k, top-p; greedy decoding applies only the penalty and takes the argmax. Logits are processed in f32
(HF upcasts the last-position logits before processing).

Top-p with top-k runs on the k survivors only: tokens that top-k removed have probability 0, so they add
nothing to the cumulative sums, and the result equals HF's full-vocabulary pass without a vocabulary sort
(`lax.top_k` keeps exactly k tokens where HF also keeps exact ties with the k-th logit; float logits do not tie
in practice).

One deliberate difference: the repetition penalty counts only a row's real tokens. HF also counts the left
padding (<|endoftext|>, one of Qwen2-VL's stop tokens) of the shorter rows, so its answers depend on what else
is in the batch; here a prompt gets the same answer alone or batched. Unpadded prompts match HF exactly.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen2vl_jax.infer.config import GenerationConfig

NEG_INF = -jnp.inf


def repetition_penalty(logits, seen, penalty: float):
    """CTRL penalty (HF `RepetitionPenaltyLogitsProcessor`): a seen token's logit is divided by `penalty`
    when positive and multiplied when negative. logits (B, V) f32; seen (B, V) bool."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_mask(logits, k: int):
    """HF `TopKLogitsWarper`: -inf below the k-th largest logit (ties with it survive)."""
    k = min(k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_sorted(sorted_logits, p: float):
    """HF `TopPLogitsWarper` on logits sorted in descending order (B, K): keep the smallest head whose
    probability reaches p. HF walks the ascending order and drops tokens whose cumulative probability from
    the bottom is <= 1 - p, always keeping the top one; this is the same test written from the top."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Ascending cumulative sum at token j = total of tokens ranked at or below j = sum from j to the end.
    from_bottom = jnp.flip(jnp.cumsum(jnp.flip(probs, -1), -1), -1)
    remove = from_bottom <= 1 - p
    remove = remove.at[..., 0].set(False)
    return jnp.where(remove, NEG_INF, sorted_logits)


def top_p_mask(logits, p: float):
    """Top-p over the whole vocabulary (when no top-k bounds the candidates)."""
    order = jnp.argsort(-logits, axis=-1)
    kept = top_p_sorted(jnp.take_along_axis(logits, order, -1), p)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, NEG_INF).at[rows, order].set(kept)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The static shape of the token choice (one compiled program each); the numbers are `Knobs`."""
    sample: bool          # False: argmax
    top_k: int            # 0: no top-k
    top_p: bool           # apply top-p
    penalty: bool         # apply the repetition penalty

    @classmethod
    def of(cls, cfg: GenerationConfig) -> "Sampler":
        sample = cfg.sampling
        return cls(sample, cfg.top_k if sample else 0, sample and cfg.top_p < 1.0, cfg.repetition_penalty != 1.0)


class Knobs(NamedTuple):
    """Traced numbers of the token choice, so changing them does not recompile."""
    temperature: jax.Array    # () f32
    top_p: jax.Array          # () f32
    penalty: jax.Array        # () f32

    @classmethod
    def of(cls, cfg: GenerationConfig) -> "Knobs":
        return cls(jnp.float32(cfg.temperature), jnp.float32(cfg.top_p), jnp.float32(cfg.repetition_penalty))


def process(logits, seen, sampler: Sampler, knobs: Knobs):
    """Processed logits (B, V) over the whole vocabulary, exactly as HF hands them to argmax/multinomial."""
    logits = logits.astype(jnp.float32)
    if sampler.penalty:
        logits = repetition_penalty(logits, seen, knobs.penalty)
    if not sampler.sample:
        return logits
    logits = logits / knobs.temperature
    if sampler.top_k:
        logits = top_k_mask(logits, sampler.top_k)
    if sampler.top_p:
        logits = top_p_mask(logits, knobs.top_p)
    return logits


def next_token(logits, seen, key, sampler: Sampler, knobs: Knobs):
    """(B, V) raw logits -> (B,) int32 token ids. `key` is used only when sampling."""
    if not sampler.sample or sampler.top_k == 0:
        logits = process(logits, seen, sampler, knobs)
        if not sampler.sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    if sampler.penalty:
        logits = repetition_penalty(logits, seen, knobs.penalty)
    # Work on the k candidates only (B, k): no vocabulary-wide sort or scatter per step.
    vals, idx = jax.lax.top_k(logits / knobs.temperature, min(sampler.top_k, logits.shape[-1]))
    if sampler.top_p:
        vals = top_p_sorted(vals, knobs.top_p)
    pick = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, pick[:, None], -1)[:, 0].astype(jnp.int32)
