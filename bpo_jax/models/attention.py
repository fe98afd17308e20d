"""Grouped-query softmax attention whose backward pass recomputes the probabilities.

Why: autodiff of plain attention keeps every layer's [B, K, G, T, S] float32 probabilities (and, on
XLA:CPU, a materialized broadcast of the softmax denominators beside them) alive from the forward
pass to the backward. At SmolLM2-135M shape (30 layers, 4 x 256 tokens) that was ~540 MiB of the DPO
step's peak, more than the whole gap to TRL, whose CPU attention kernel keeps only a logsumexp.
Here the forward pass saves q, k, v, the mask and the per-row max and sum of the exponentials
([B, K, G, T] each); the backward recomputes the probabilities from them (one extra q k^T per
layer, ~1% of the step's FLOPs) and applies the softmax gradient. `jax.checkpoint` around plain
attention does not do this on XLA:CPU: the scheduler hoists the recomputation into the forward pass
and the probabilities are live at the peak again (measured). The recomputation here depends on the
incoming gradient's data, so it runs layer by layer in the backward (see `_attention_bwd`).

The forward values are the plain computation's; gradients equal jax.grad of it to float32 rounding
(tested). Like the projections' matmuls (bpo_jax.models.matmul), it is used on a single CPU device,
where it was measured; meshes keep the plain attention. With it on a CPU mesh, a run on 2 processes x
4 devices stopped matching 1 x 8 in its sampled responses: the two layouts' trainings already differ
in the last float32 bit (collective summation order), and the changed rounding flipped a sampled token.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from bpo_jax.models.matmul import single_cpu_device

_MASKED = jnp.finfo(jnp.float32).min


def grouped_query_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None
) -> jax.Array:
    """Softmax attention with query heads grouped over shared kv heads; softmax in float32.

    q [B, T, H, D], k/v [B, S, K, D] with H a multiple of K, mask [B, T, S] (True = attend)
    -> [B, T, H, D] in q's dtype. Scores are scaled by `scale` (default D ** -0.5).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    q, k = q.reshape(b, t, kvh, h // kvh, d), k.astype(q.dtype)
    if single_cpu_device():
        # Heads first, so that every dot is a plain matmul batched over (B, K) with (G, T) as its rows:
        # XLA:CPU ran the DPO step's attention dots 2x faster than on [B, T, K, G, D] (measured).
        out = _recomputing_attention(q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                     mask, scale).transpose(0, 3, 1, 2, 4)
    else:
        out = _plain_attention(q, k, v, mask, scale)
    return out.reshape(b, t, h, d).astype(q.dtype)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """`grouped_query_attention` over a KV cache's layout (forward only, for decoding).

    q [B, T, H, D], keys [B, K, S, D], values [B, K, D, S] (see llama.KVCache), mask [B, T, S]
    -> [B, T, H, D] in q's dtype.
    """
    b, t, h, d = q.shape
    kvh = keys.shape[1]
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(_masked(scores * scale, mask), axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bkds->btkgd", probs, values)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _plain_attention(q, k, v, mask, scale: float) -> jax.Array:
    """Grouped attention [B, T, K, G, D] -> [B, T, K, G, D], differentiated by JAX's own rules."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(_masked(scores * scale, mask), axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _masked(scores: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask[:, None, None, :, :], scores, _MASKED)


def _scores(q, k, mask, scale: float) -> jax.Array:
    """Masked scaled scores [B, K, G, T, S] float32 of heads-first q [B, K, G, T, D] and k [B, K, S, D]."""
    return _masked(jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale, mask)


def _probabilities(scores: jax.Array, row_max: jax.Array, row_sum: jax.Array) -> jax.Array:
    """float32 softmax of the scores from their row max and row sum of exponentials."""
    return jnp.exp(scores - row_max[..., None]) / row_sum[..., None]


def _forward(q, k, v, mask, scale: float):
    scores = _scores(q, k, mask, scale)
    row_max = scores.max(axis=-1)
    row_sum = jnp.exp(scores - row_max[..., None]).sum(axis=-1)
    probs = _probabilities(scores, row_max, row_sum).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v), (row_max, row_sum)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _recomputing_attention(q, k, v, mask, scale: float) -> jax.Array:
    """`_plain_attention` on heads-first operands, q [B, K, G, T, D] and k/v [B, K, S, D] -> [B, K, G, T, D],
    whose backward pass recomputes the probabilities (see the module docstring)."""
    return _forward(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale: float):
    out, (row_max, row_sum) = _forward(q, k, v, mask, scale)
    return out, (q, k, v, mask, row_max, row_sum)


def _attention_bwd(scale: float, residuals, d_out):
    # The barrier hides that the recomputation's inputs are the forward's (else XLA reuses the forward's
    # [.., T, S] broadcasts of the row max and sum, keeping them alive in between). XLA:CPU drops
    # barriers before it schedules, so a data dependence on d_out (a product with zero that XLA does
    # not fold for floats) keeps the recomputation out of the forward pass: both measured.
    (q, k, v, mask, row_max, row_sum), d_out = jax.lax.optimization_barrier((residuals, d_out))
    q = q + 0.0 * d_out.astype(q.dtype)
    p32 = _probabilities(_scores(q, k, mask, scale), row_max, row_sum)
    d_v = jnp.einsum("bkgts,bkgtd->bksd", p32.astype(v.dtype), d_out.astype(v.dtype))
    d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out.astype(v.dtype), v).astype(jnp.float32)
    # The softmax gradient from the float32 probabilities, as JAX's rule for jax.nn.softmax uses them.
    d_scores = p32 * (d_probs - (d_probs * p32).sum(axis=-1, keepdims=True)) * scale
    d_scores = jnp.where(mask[:, None, None, :, :], d_scores, 0.0)
    d_q = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bkgts,bkgtd->bksd", d_scores, q, preferred_element_type=jnp.float32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_recomputing_attention.defvjp(_attention_fwd, _attention_bwd)
