"""The projections' matmuls (x W, and LoRA's x A B) with a backward pass laid out for XLA:CPU.

Why: a weight gradient contracts over tokens (x^T dy). XLA:CPU's layout assignment serves that dot
by writing the [tokens, out] output gradient transposed, inside the elementwise fusion that produces
it: a strided write measured at ~37 ms for a [1024, 1536] float32 array, several times the arithmetic
around it. At SmolLM2-135M shape those writes were 24% of a LoRA DPO step's thunk time (the adapters'
B gradient forced one per target projection) and 16% of a full one. Here the backward transposes
the smaller operand itself, as a standalone transpose behind an optimization barrier (XLA cannot
fold it back into a producer), and every dot has the canonical [M, K] x [K, N] form.

The values are the plain matmul's (gradients equal jax.grad's to float32 rounding, tested). Other
backends keep the plain matmul: the layout problem was measured on CPU only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _transposed(x: jax.Array) -> jax.Array:
    """x.T as its own materialized array (the barrier keeps XLA from folding it into a fusion)."""
    return jax.lax.optimization_barrier(x.T)


def _weight_gradient(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T dy for x [..., in] and dy [..., out] -> [in, out], transposing the smaller of the two."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    if x2.shape[1] <= dy2.shape[1]:
        return _transposed(x2) @ dy2
    return (_transposed(dy2) @ x2).T


@jax.custom_vjp
def _cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _cpu_matmul_fwd(x, w):
    return x @ w, (x, w)


def _cpu_matmul_bwd(res, dy):
    x, w = res
    return dy @ w.T, _weight_gradient(x, dy).astype(w.dtype)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


@jax.custom_vjp
def _cpu_adapter(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    return (x @ a) @ b


def _cpu_adapter_fwd(x, a, b):
    xa = x @ a
    return xa @ b, (x, a, b, xa)


def _cpu_adapter_bwd(res, dy):
    x, a, b, xa = res
    dxa = dy @ b.T
    return dxa @ a.T, _weight_gradient(x, dxa).astype(a.dtype), _weight_gradient(xa, dy).astype(b.dtype)


_cpu_adapter.defvjp(_cpu_adapter_fwd, _cpu_adapter_bwd)


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [..., in], w [in, out]."""
    return _cpu_matmul(x, w) if _on_cpu() else x @ w


def adapter_matmul(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a) @ b, LoRA's low-rank update, for x [..., in], a [in, r], b [r, out]."""
    return _cpu_adapter(x, a, b) if _on_cpu() else (x @ a) @ b
