"""The projections' CPU matmuls (bpo_jax.models.matmul): same values and gradients as the plain
expressions under jax.grad, for either operand being the smaller one, batched rows, vmap (per-sample
gradients) and bfloat16; the backward carries no transposed copy of the output gradient; and they are
used on one CPU device only (the tests run on 8 emulated devices, so they call them directly)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.models import matmul as matmul_module
from bpo_jax.models.matmul import cpu_matmul as matmul


def adapter_matmul(x, a, b):
    """LoRA's update as bpo_jax.models.matmul.adapter_matmul builds it on one CPU device."""
    return matmul(matmul(x, a), b)


def arrays(*shapes, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def loss_of(f):
    """A scalar that weighs every output differently (a plain sum would hide transposition errors)."""
    def loss(*args):
        y = f(*args)
        weights = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y.astype(jnp.float32) * weights)
    return loss


@pytest.mark.parametrize("inner,outer", [(8, 24), (24, 8)])  # x smaller than dy, then the other way
def test_matmul_gradients_equal_the_plain_ones(inner, outer):
    x, w = arrays((3, 5, inner), (inner, outer))
    np.testing.assert_array_equal(matmul(x, w), x @ w)
    ours = jax.grad(loss_of(matmul), argnums=(0, 1))(x, w)
    plain = jax.grad(loss_of(lambda x, w: x @ w), argnums=(0, 1))(x, w)
    for got, want in zip(ours, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_adapter_gradients_equal_the_plain_ones_also_per_sample():
    x, a, b = arrays((4, 6, 16), (16, 3), (3, 20))
    np.testing.assert_allclose(adapter_matmul(x, a, b), (x @ a) @ b, rtol=1e-6)
    plain_loss = loss_of(lambda x, a, b: (x @ a) @ b)
    ours = jax.grad(loss_of(adapter_matmul), argnums=(0, 1, 2))(x, a, b)
    plain = jax.grad(plain_loss, argnums=(0, 1, 2))(x, a, b)
    for got, want in zip(ours, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Per-sample gradients (as the gradient features take them): vmap over the batch axis.
    per_sample = jax.vmap(jax.grad(loss_of(adapter_matmul), argnums=(1, 2)), in_axes=(0, None, None))(x, a, b)
    expected = jax.vmap(jax.grad(plain_loss, argnums=(1, 2)), in_axes=(0, None, None))(x, a, b)
    for got, want in zip(per_sample, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtype_and_values():
    x, w = arrays((2, 4, 8), (8, 16), dtype=jnp.bfloat16)
    gx, gw = jax.grad(loss_of(matmul), argnums=(0, 1))(x, w)
    px, pw = jax.grad(loss_of(lambda x, w: x @ w), argnums=(0, 1))(x, w)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(pw, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(px, np.float32), rtol=2e-2, atol=2e-2)


def test_weight_gradient_does_not_write_the_output_gradient_transposed():
    """What the module is for: in a SwiGLU-like block the plain backward makes XLA:CPU write the
    [tokens, out] gradient transposed inside a fusion; ours transposes only the smaller operand."""
    x, w, up, w2 = arrays((2, 64, 24), (24, 96), (2, 64, 96), (96, 24))

    def block(mm):
        return lambda w, w2: jnp.sum(mm(jax.nn.silu(mm(x, w)) * up, w2) ** 2)

    def transposed_big_writes(mm) -> int:
        text = jax.jit(jax.grad(block(mm), argnums=(0, 1))).lower(w, w2).compile().as_text()
        # a fusion whose result is the [96, 128] (out x tokens) transpose of an output gradient
        return len(re.findall(r"fusion[.\d]* = f32\[96,128\]", text))

    assert transposed_big_writes(lambda x, w: x @ w) > 0  # the problem exists in this XLA
    assert transposed_big_writes(matmul) == 0


def test_used_on_one_cpu_device_only(monkeypatch):
    x, w, b = arrays((2, 3, 4), (4, 5), (5, 6))

    def backward(f, *args) -> str:
        return str(jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=tuple(range(len(args)))))(*args))

    assert jax.device_count() == 8  # conftest: 8 emulated CPU devices -> the plain matmul
    assert not matmul_module.single_cpu_device()
    assert "optimization_barrier" not in backward(matmul_module.matmul, x, w)
    monkeypatch.setattr(matmul_module.jax, "device_count", lambda: 1)
    assert matmul_module.single_cpu_device()
    assert "optimization_barrier" in backward(matmul_module.matmul, x, w)
    assert "optimization_barrier" in backward(matmul_module.adapter_matmul, x, w, b)
