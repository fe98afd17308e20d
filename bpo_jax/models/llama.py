"""One decoder for Llama 2/3, Mistral, Qwen2, Qwen3 and Gemma 3 (text) in Flax NNX.

The families differ only in switches of `ModelConfig.family` (q/k norms, Gemma's offset norms
and extra norms around attention and MLP, embedding scale, activation) and in which layers attend
through a sliding window (`ModelConfig.layer_window`); the forward pass reads those switches.

Parameter names mirror Hugging Face's module tree (``layers[i].self_attn.q_proj.kernel`` for
``model.layers.i.self_attn.q_proj.weight``) so checkpoint import/export is a rename + transpose.

Attention masking is expressed with *segment ids*: tokens attend causally to earlier tokens of
the same non-zero segment. A plain padded batch uses ``segment_ids = attention_mask`` (pads are
segment 0), a packed batch numbers its examples 1, 2, ... in one row. Positions default to
``cumsum(attention_mask) - 1`` so left- and right-padded batches give the same logits per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bpo_jax.models.attention import cached_attention, grouped_query_attention
from bpo_jax.models.config import ACTIVATIONS, ModelConfig, resolve_dtype, rope_inverse_frequencies
from bpo_jax.models.matmul import adapter_matmul, matmul


class KVCache(NamedTuple):
    """Preallocated keys and values per layer, laid out for a decode step's two attention matmuls:
    keys [batch, kv_heads, max_len, head_dim], values [batch, kv_heads, head_dim, max_len]: the
    layouts XLA:CPU's dots read in place. A [batch, max_len, kv_heads, head_dim] layout made it copy
    every layer's whole cache into these at every step (~10% of SmolLM2-135M sampling time)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]


class Linear(nnx.Module):
    """y = x W (+ b) (+ LoRA: x A B * scale); kernel stored [in, out]."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, config: ModelConfig, rngs: nnx.Rngs):
        pdt = resolve_dtype(config.param_dtype)
        self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (in_features, out_features), pdt))
        self.bias = nnx.Param(jnp.zeros((out_features,), pdt)) if use_bias else None
        # LoRA adapters are attached later by bpo_jax.models.lora (data attributes, None when off).
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0
        self.dtype = resolve_dtype(config.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None and self.lora_scale:  # scale 0: adapters switched off
            a = self.lora_a[...].astype(self.dtype)
            b = self.lora_b[...].astype(self.dtype)
            y = y + adapter_matmul(x, a, b) * jnp.asarray(self.lora_scale, self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMS norm times a learned scale; Gemma's variant scales by (1 + weight) in float32."""

    def __init__(self, dim: int, *, config: ModelConfig):
        self.offset = config.family.norm_offset
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - self.offset, resolve_dtype(config.param_dtype)))
        self.eps = config.rms_norm_eps
        self.dtype = resolve_dtype(config.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, config: ModelConfig, rngs: nnx.Rngs):
        pdt = resolve_dtype(config.param_dtype)
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (vocab_size, dim), pdt))
        self.dtype = resolve_dtype(config.dtype)
        # Gemma scales input embeddings by sqrt(hidden) (rounded to the weights' dtype, as HF does).
        self.scale = float(dim**0.5) if config.family.embed_scale else None

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding[...], ids, axis=0)
        if self.scale is not None:
            x = x * jnp.asarray(self.scale, x.dtype)
        return x.astype(self.dtype)


def rotary_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, 1, head_dim] in float32 (Hugging Face's half-split layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def within_window(q_positions: jax.Array, k_positions: jax.Array, window: int | None) -> jax.Array | bool:
    """[B, T, S] bool: key at most window - 1 positions before the query (True when no window).

    Distances are in token positions, not array slots, so padding between a prompt and its
    continuation, or other examples packed into the row, never eat into the window.
    """
    if window is None:
        return True
    return q_positions[:, :, None] - k_positions[:, None, :] < window


def segment_attention_mask(segment_ids: jax.Array, positions: jax.Array | None = None, window: int | None = None) -> jax.Array:
    """[B, T, T] bool: causal, within the same segment, never onto padding (segment 0), and
    within `window` positions (needs `positions`) for sliding-window layers."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = causal[None] & same & (segment_ids[:, None, :] != 0)
    return mask & within_window(positions, positions, window) if window is not None else mask


def cache_attention_mask(
    attention_mask: jax.Array,
    cache_index: jax.Array,
    num_queries: int,
    positions: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """[B, T, S] bool for T new tokens written at cache slots cache_index..cache_index+T-1.

    `attention_mask` [B, S] marks which cache slots hold real tokens (as in Hugging Face
    generate, it covers past and new tokens). With a `window`, the queries' `positions` [B, T]
    are compared with each slot's position, the count of real slots before it.
    """
    s = attention_mask.shape[1]
    q_slot = cache_index + jnp.arange(num_queries)
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]
    mask = causal[None] & (attention_mask[:, None, :] != 0)
    if window is None:
        return mask
    slot_positions = jnp.cumsum(attention_mask != 0, axis=1) - 1
    return mask & within_window(positions, slot_positions, window)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        bias = config.attention_bias
        self.q_proj = Linear(h, self.num_heads * hd, use_bias=bias, config=config, rngs=rngs)
        self.k_proj = Linear(h, self.num_kv_heads * hd, use_bias=bias, config=config, rngs=rngs)
        self.v_proj = Linear(h, self.num_kv_heads * hd, use_bias=bias, config=config, rngs=rngs)
        # Qwen2 has q/k/v biases but none on o_proj; elsewhere attention_bias covers all four.
        o_bias = bias and not config.family.qkv_bias_only
        self.o_proj = Linear(self.num_heads * hd, h, use_bias=o_bias, config=config, rngs=rngs)
        qk_norm = config.family.qk_norm
        self.q_norm = RMSNorm(hd, config=config) if qk_norm else None
        self.k_norm = RMSNorm(hd, config=config) if qk_norm else None
        self.scale = (config.query_pre_attn_scalar or hd) ** -0.5

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if cache is None:
            return self.o_proj(grouped_query_attention(q, k, v, mask, self.scale).reshape(b, t, -1)), None
        keys = jax.lax.dynamic_update_slice(
            cache[0], k.transpose(0, 2, 1, 3).astype(cache[0].dtype), (0, 0, cache_index, 0)
        )
        values = jax.lax.dynamic_update_slice(
            cache[1], v.transpose(0, 2, 3, 1).astype(cache[1].dtype), (0, 0, 0, cache_index)
        )
        out = cached_attention(q, keys, values, mask, self.scale)
        return self.o_proj(out.reshape(b, t, -1)), (keys, values)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, use_bias=bias, config=config, rngs=rngs)
        self.up_proj = Linear(h, i, use_bias=bias, config=config, rngs=rngs)
        self.down_proj = Linear(i, h, use_bias=bias, config=config, rngs=rngs)
        self.act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config=config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)
        # Gemma: post_attention_layernorm normalizes the attention output, two more wrap the MLP.
        sandwich = config.family.sandwich_norms
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config=config) if sandwich else None
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config=config) if sandwich else None

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        if self.pre_feedforward_layernorm is None:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x)), new_cache
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), new_cache


def _layer_no_cache(layer: DecoderLayer, x, cos, sin, mask):
    return layer(x, cos, sin, mask)[0]


_layer_remat = nnx.remat(_layer_no_cache)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


class CausalLM(nnx.Module):
    """Decoder backbone with a language-model head, or a scalar score head for reward models."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config=config, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config=config)
        h = config.hidden_size
        self.score = (
            Linear(h, config.num_labels, use_bias=False, config=config, rngs=rngs) if config.is_reward_model else None
        )
        untied = not config.is_reward_model and not config.tie_word_embeddings
        self.lm_head = Linear(h, config.vocab_size, use_bias=False, config=config, rngs=rngs) if untied else None

    # -- forward passes -------------------------------------------------------------------------
    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final normed hidden states [B, T, H] (no cache)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if segment_ids is None:
            segment_ids = attention_mask
        elif positions is None:
            raise ValueError("packed input (segment_ids) needs explicit per-segment positions")
        if positions is None:
            positions = default_positions(attention_mask)
        inputs = self._layer_inputs(positions, lambda window: segment_attention_mask(segment_ids, positions, window))
        x = self.embed_tokens(input_ids)
        run = _layer_remat if self.config.remat else _layer_no_cache
        for layer, (cos, sin, mask) in zip(self.layers, inputs):
            x = run(layer, x, cos, sin, mask)
        return self.norm(x)

    def _layer_inputs(self, positions: jax.Array, make_mask) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        """(cos, sin, mask) per layer: sliding layers get their window (and Gemma's local rope);
        each distinct table or mask is built once. `make_mask(window)` builds a mask."""
        c = self.config
        built: dict = {}

        def once(key, make):
            if key not in built:
                built[key] = make()
            return built[key]

        out = []
        for i in range(c.num_hidden_layers):
            window = c.layer_window(i)
            local = window is not None and c.rope_local_theta is not None
            cos, sin = once(("rope", local), lambda: rotary_tables(positions, rope_inverse_frequencies(c, local)))
            out.append((cos, sin, once(("mask", window), lambda: make_mask(window))))
        return out

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] (or scores [B, T, num_labels] for a reward model)."""
        return self.logits_from_hidden(self.hidden_states(input_ids, attention_mask, positions, segment_ids))

    def head_kernel(self) -> jax.Array:
        """The output projection [H, V] (the transposed embedding when tied)."""
        if self.score is not None:
            return self.score.kernel[...]
        if self.lm_head is not None:
            return self.lm_head.kernel[...]
        return self.embed_tokens.embedding[...].T

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        head = self.score if self.score is not None else self.lm_head
        if head is not None:
            return head(hidden)
        dtype = resolve_dtype(self.config.dtype)
        return matmul(hidden.astype(dtype), self.embed_tokens.embedding[...].T.astype(dtype))

    def rewards(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Reward-model scores [B, num_labels] read at each row's last real token."""
        scores = self(input_ids, attention_mask)
        t = attention_mask.shape[1]
        last = jnp.argmax(jnp.where(attention_mask != 0, jnp.arange(t)[None, :], -1), axis=1)
        return jnp.take_along_axis(scores, last[:, None, None], axis=1)[:, 0, :].astype(jnp.float32)

    # -- incremental decoding -------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        c = self.config
        dtype = resolve_dtype(dtype or c.dtype)
        kv, d, n = c.num_key_value_heads, c.head_dim, c.num_hidden_layers
        keys = tuple(jnp.zeros((batch_size, kv, max_length, d), dtype) for _ in range(n))
        return KVCache(keys, tuple(jnp.zeros((batch_size, kv, d, max_length), dtype) for _ in range(n)))

    def forward_with_cache(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache,
        cache_index: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Run T new tokens written at cache slots cache_index.. and return (logits, cache).

        attention_mask [B, S] covers every cache slot (past and new) and marks real tokens.
        """
        t = input_ids.shape[1]
        inputs = self._layer_inputs(
            positions, lambda window: cache_attention_mask(attention_mask, cache_index, t, positions, window)
        )
        x = self.embed_tokens(input_ids)
        keys, values = [], []
        for layer, k, v, (cos, sin, mask) in zip(self.layers, cache.keys, cache.values, inputs):
            x, (k, v) = layer(x, cos, sin, mask, (k, v), cache_index)
            keys.append(k)
            values.append(v)
        return self.logits_from_hidden(self.norm(x)), KVCache(tuple(keys), tuple(values))


def init_model(config: ModelConfig, seed: int = 0) -> CausalLM:
    """A randomly initialized model (normal(0.02) weights, unit norms), as for tests and pretraining."""
    return CausalLM(config, rngs=nnx.Rngs(params=seed))
