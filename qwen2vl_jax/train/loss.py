"""Cross-entropy over assistant tokens, as sums, so any number of packed examples, rows and micro-batches
normalise by the one total that matters: the target tokens of the whole optimizer step.

`labels` are next-token targets already shifted inside each packed example and `loss_mask` marks the real
ones (the data pipeline builds both), so no shift happens here and no token ever predicts across examples.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class LossSums(NamedTuple):
    ce: jax.Array        # () sum of -log p(target) over target tokens
    z: jax.Array         # () sum of logsumexp(logits)^2 over target tokens (the z-loss)
    correct: jax.Array   # () target tokens whose argmax is the target

    def __add__(self, other):
        return LossSums(*(a + b for a, b in zip(self, other)))


def token_sums(logits, labels, loss_mask) -> LossSums:
    """logits (B, L, V) in any dtype; labels (B, L) int; loss_mask (B, L) float. Maths in f32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                   # (B, L)
    # A masked select instead of a gather keeps a vocab-sharded logits tensor sharded.
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == labels[..., None]
    target = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)                   # (B, L)
    correct = (jnp.max(logits, axis=-1) <= target).astype(jnp.float32)
    m = loss_mask.astype(jnp.float32)
    return LossSums(ce=jnp.sum((lse - target) * m), z=jnp.sum(jnp.square(lse) * m), correct=jnp.sum(correct * m))


def chunked_token_sums(logits_fn: Callable, hidden, labels, loss_mask, chunk: int) -> LossSums:
    """`token_sums(logits_fn(hidden), ...)` without materialising all (B, L, V) logits: the positions go
    through the head `chunk` at a time under `jax.checkpoint`, so the backward pass recomputes each
    chunk's logits instead of keeping them. hidden (B, L, D); L must be a multiple of `chunk`."""
    b, l, d = hidden.shape
    if l % chunk:
        raise ValueError(f"loss_chunk {chunk} must divide the text length {l} of every bucket")
    n = l // chunk

    def to_chunks(x):   # (B, L, ...) -> (n, B, chunk, ...)
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(h, y, m):
        return token_sums(logits_fn(h), y, m)

    def body(acc, xs):
        return acc + one(*xs), None

    zero = LossSums(*(jnp.zeros((), jnp.float32) for _ in LossSums._fields))
    sums, _ = jax.lax.scan(body, zero, (to_chunks(hidden), to_chunks(labels), to_chunks(loss_mask)))
    return sums
