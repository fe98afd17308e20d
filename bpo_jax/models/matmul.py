"""The projections' matmuls (x W, and LoRA's x A B) with a backward pass laid out for XLA:CPU.

Why: a weight gradient contracts over tokens (x^T dy). XLA:CPU's layout assignment serves that dot
by writing the [tokens, out] output gradient transposed, inside the elementwise fusion that produces
it: a strided write measured at ~37 ms for a [1024, 1536] float32 array, several times the arithmetic
around it. At SmolLM2-135M shape those writes were 24% of a LoRA DPO step's thunk time (the adapters'
B gradient forced one per target projection) and 16% of a full one. Here the backward transposes
the smaller operand itself, as a standalone transpose behind an optimization barrier (XLA cannot
fold it back into a producer), and every dot has the canonical [M, K] x [K, N] form.

The values are the plain matmul's (gradients equal jax.grad's to float32 rounding, tested). It is
used on a single CPU device only, where it was measured: other backends and CPU meshes keep the plain
matmul. (On a CPU mesh a run on 2 processes x 4 devices then no longer matched 1 x 8 to the byte. Not
because the code is wrong there: even with the plain matmul those two layouts train weights that differ
in the last float32 bit (collective summation order), and a change of rounding can flip a sampled token.)
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
def cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w with the CPU-laid-out backward."""
    return x @ w


def _cpu_matmul_fwd(x, w):
    return x @ w, (x, w)


def _cpu_matmul_bwd(res, dy):
    x, w = res
    return dy @ w.T, _weight_gradient(x, dy).astype(w.dtype)


cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def single_cpu_device() -> bool:
    """Where the CPU-specific backward passes are used (this module's, bpo_jax.models.attention's and
    losses.token_logps'): one CPU device, where they were measured (see the module docstring)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [..., in], w [in, out]."""
    return cpu_matmul(x, w) if single_cpu_device() else x @ w


def adapter_matmul(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """(x @ a) @ b, LoRA's low-rank update, for x [..., in], a [in, r], b [r, out]. Two matmuls, each
    with its own backward: B's gradient transposes the small [tokens, r] x @ a, A's the small d(x @ a)."""
    return matmul(matmul(x, a), b)
