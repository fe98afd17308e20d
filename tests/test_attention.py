"""Attention (bpo_jax.models.attention): values equal an independent per-head NumPy softmax attention;
the recomputing backward's gradients equal jax.grad of the plain jnp expression (also per sample under
vmap, and in bfloat16) and it keeps no [.., T, S] probabilities from the forward pass (compiled temp
memory of a stack of layers); the decode-layout variant equals the training one. The tests run on 8
emulated devices, where the plain attention is used; `one_cpu_device` switches to the recomputing one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.models import attention as attention_module
from bpo_jax.models.attention import cached_attention, grouped_query_attention


@pytest.fixture
def one_cpu_device(monkeypatch):
    """grouped_query_attention as on one CPU device: the recomputing backward."""
    monkeypatch.setattr(attention_module, "single_cpu_device", lambda: True)


def plain_attention(q, k, v, mask, scale):
    """Attention as jnp writes it, differentiated by JAX's own rules (the reference for gradients)."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d).astype(q.dtype)


def numpy_attention(q, k, v, mask, scale):
    """One head at a time in float64; a row with nothing to attend to averages every value (as a
    softmax over equal masked scores does)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        for head in range(h):
            kv = head // group
            scores = q[i, :, head] @ k[i, :, kv].T * scale
            scores = np.where(mask[i], scores, -np.inf)
            empty = ~mask[i].any(axis=-1)
            scores[empty] = 0.0
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out[i, :, head] = (weights / weights.sum(axis=-1, keepdims=True)) @ v[i, :, kv]
    return out


def inputs(b=2, t=7, h=6, kvh=2, d=8, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, d)).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, kvh, d)).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, kvh, d)).astype(dtype)
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    mask[1, :, 5:] = False  # row 1 is right-padded after 5 tokens
    mask[1, 6, :] = False  # and one query attends to nothing
    weights = jax.random.normal(keys[3], (b, t, h, d))
    return q, k, v, jnp.asarray(mask), weights


def weighted(f, mask, weights, scale):
    return lambda q, k, v: jnp.sum(f(q, k, v, mask, scale).astype(jnp.float32) * weights)


@pytest.mark.parametrize("h,kvh", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("device", ["mesh", "one_cpu"])
def test_values_equal_an_independent_attention(h, kvh, device, request):
    if device == "one_cpu":
        request.getfixturevalue("one_cpu_device")
    q, k, v, mask, _ = inputs(h=h, kvh=kvh)
    got = grouped_query_attention(q, k, v, mask, 0.3)
    np.testing.assert_allclose(got, numpy_attention(q, k, v, np.asarray(mask), 0.3), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(grouped_query_attention(q, k, v, mask), grouped_query_attention(q, k, v, mask, 8**-0.5))


def test_gradients_equal_the_plain_expression(one_cpu_device):
    q, k, v, mask, weights = inputs()
    ours = jax.jit(jax.grad(weighted(grouped_query_attention, mask, weights, 0.3), argnums=(0, 1, 2)))(q, k, v)
    plain = jax.grad(weighted(plain_attention, mask, weights, 0.3), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(ours, plain):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_under_vmap(one_cpu_device):
    q, k, v, mask, weights = inputs()

    def per_sample(f):
        def one(q, k, v, mask, w):
            return jax.grad(weighted(f, mask[None], w[None], 0.3), argnums=(0, 1, 2))(q[None], k[None], v[None])
        return jax.vmap(one)(q, k, v, mask, weights)

    for got, want in zip(per_sample(grouped_query_attention), per_sample(plain_attention)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_gradients_are_close_and_keep_dtypes(one_cpu_device):
    q, k, v, mask, weights = inputs(dtype=jnp.bfloat16)
    out = grouped_query_attention(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    ours = jax.grad(weighted(grouped_query_attention, mask, weights, 0.3), argnums=(0, 1, 2))(q, k, v)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    plain = jax.grad(weighted(plain_attention, mask, weights, 0.3), argnums=(0, 1, 2))(*f32)
    for got, want in zip(ours, plain):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.03 * scale)


def test_backward_keeps_no_probabilities_from_the_forward_pass(one_cpu_device):
    """A stack of layers: plain autodiff holds every layer's [B, K, G, T, S] float32 probabilities until
    the backward pass reaches it; ours holds none of them (compiled temp memory)."""
    layers, b, t, h, kvh, d = 12, 2, 256, 4, 2, 16
    q, k, v, _, _ = inputs(b=b, t=t, h=h, kvh=kvh, d=d)
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None].repeat(b, 0))

    def stack(attend):
        def loss(q):
            x = q
            for _ in range(layers):
                x = jnp.tanh(attend(x, k, v, mask, 0.25))
            return x.sum()
        return jax.jit(jax.grad(loss)).lower(q).compile().memory_analysis().temp_size_in_bytes

    probs_bytes = b * h * t * t * 4
    plain, ours = stack(plain_attention), stack(grouped_query_attention)
    assert plain >= layers * probs_bytes, (plain, probs_bytes)  # what the test would catch
    # One layer's backward at a time: a few [.., T, S] arrays, however many layers there are.
    assert ours <= 6 * probs_bytes, (ours, probs_bytes)


def test_cache_layout_variant_equals_the_training_attention():
    q, k, v, mask, _ = inputs()
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # llama.KVCache layouts
    np.testing.assert_allclose(
        cached_attention(q, keys, values, mask, 0.3), grouped_query_attention(q, k, v, mask, 0.3), rtol=1e-6, atol=1e-6
    )


def test_meshes_use_the_plain_attention_and_one_cpu_device_the_recomputing_one(monkeypatch):
    assert jax.device_count() == 8  # conftest: 8 emulated CPU devices
    q, k, v, mask, weights = inputs()
    plain = jax.grad(weighted(plain_attention, mask, weights, 0.3))(q, k, v)
    ours = jax.grad(weighted(grouped_query_attention, mask, weights, 0.3))(q, k, v)
    np.testing.assert_array_equal(ours, plain)  # the same expression, so the same bits
    lowered = jax.jit(jax.grad(weighted(grouped_query_attention, mask, weights, 0.3))).lower(q, k, v).as_text()
    assert "optimization_barrier" not in lowered
    monkeypatch.setattr(attention_module.jax, "device_count", lambda: 1)
    lowered = jax.jit(jax.grad(weighted(grouped_query_attention, mask, weights, 0.3))).lower(q, k, v).as_text()
    assert "optimization_barrier" in lowered
