"""Prefill and the decode loop: pure functions of (params, arrays), jitted by `infer.generator.Generator`.

Prefill runs the left-padded prompt (packed batch format, one example per row) through the model once,
writing its keys/values at cache slots 0..L-1, and returns the logits of the last slot. The decode loop is a
`lax.while_loop` on the device: one token per iteration, no host round trip, and it stops as soon as every
row has produced an EOS.

M-RoPE during decoding (docs/design.md, "Position ids"): generated token k of row b sits at slot L + k and gets position
`next_pos[b] + k` in all three streams, where next_pos = max prompt position + 1. This equals transformers'
`cache_position + rope_delta`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen2vl_jax.infer import cache as kv
from qwen2vl_jax.infer.sampling import Knobs, Sampler, next_token


class Decoded(NamedTuple):
    tokens: jax.Array            # (B, N) int32; pad_token_id after a row's EOS and after `steps`
    steps: jax.Array             # () int32: tokens generated before every row stopped (<= N)
    logits: jax.Array | None     # (B, N, V) f32 raw logits of each chosen token's step, when asked for


def _last_logits(m, batch, cache, kv_segment_ids, cache_index):
    h, cache = m.hidden(batch, cache, kv_segment_ids, cache_index)
    return m.logits(h[:, -1]).astype(jnp.float32), cache


def seen_tokens(input_ids, segment_ids, vocab_size: int):
    """(B, V) bool: tokens present in each row's prompt, padding excluded (for the repetition penalty)."""
    rows = jnp.arange(input_ids.shape[0])[:, None]
    counts = jnp.zeros((input_ids.shape[0], vocab_size), jnp.int32).at[rows, input_ids].add(
        (segment_ids > 0).astype(jnp.int32))
    return counts > 0


def prefill(module, params, batch, kv_segment_ids, cache_len: int, with_seen: bool):
    """batch: packed prompt rows (B, L); kv_segment_ids (B, S) = attention mask then ones.
    Returns (next-token logits (B, V) f32, cache, seen (B, V) bool or None)."""
    b = batch["input_ids"].shape[0]
    cache = kv.init_cache(module.config.text, b, cache_len, module.dtype)
    logits, cache = module.apply({"params": params}, batch, cache, kv_segment_ids, 0, method=_last_logits)
    seen = None
    if with_seen:
        seen = seen_tokens(batch["input_ids"], batch["segment_ids"], logits.shape[-1])
    return logits, kv.constrain(cache), seen


def decode(module, params, cache, logits, seen, kv_segment_ids, next_pos, key, knobs: Knobs, eos, pad, *,
           prompt_len: int, max_new_tokens: int, sampler: Sampler, return_logits: bool = False) -> Decoded:
    """Generate up to `max_new_tokens` tokens per row from the prefill state.

    logits (B, V): the prefill's next-token logits; next_pos (B,) int32; kv_segment_ids (B, S);
    eos (E,) int32 stop ids (-1 for none); pad () int32, written after a row's EOS.
    """
    b, vocab = logits.shape
    n = max_new_tokens
    rows = jnp.arange(b)

    def choose(logits, seen, key, done):
        key, sub = jax.random.split(key)
        tok = next_token(logits, seen, sub, sampler, knobs)
        # HF order: a finished row emits pad, then the EOS test runs on what was emitted.
        tok = jnp.where(done, pad, tok)
        done = done | jnp.isin(tok, eos)
        if seen is not None:
            seen = seen.at[rows, tok].set(True)
        return tok, seen, key, done

    tok, seen, key, done = choose(logits, seen, key, jnp.zeros((b,), bool))
    out = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok)
    out_logits = jnp.zeros((b, n, vocab), jnp.float32).at[:, 0].set(logits) if return_logits else None
    ones = jnp.ones((b, 1), jnp.int32)

    def cond(state):
        step, _, done, *_ = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, tok, done, out, seen, key, cache, out_logits = state
        # Feed token step-1 (slot L + step - 1) and choose token `step`.
        pos = jnp.broadcast_to((next_pos + step - 1)[None, :, None], (3, b, 1))
        batch = {"input_ids": tok[:, None], "positions": pos, "segment_ids": ones}
        logits, cache = module.apply({"params": params}, batch, cache, kv_segment_ids, prompt_len + step - 1,
                                     method=_last_logits)
        cache = kv.constrain(cache)
        tok, seen, key, done = choose(logits, seen, key, done)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        if out_logits is not None:
            out_logits = jax.lax.dynamic_update_slice(out_logits, logits[:, None], (0, step, 0))
        return step + 1, tok, done, out, seen, key, cache, out_logits

    state = (jnp.int32(1), tok, done, out, seen, key, cache, out_logits)
    step, _, _, out, _, _, _, out_logits = jax.lax.while_loop(cond, body, state)
    return Decoded(out, step, out_logits)
