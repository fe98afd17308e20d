"""Model configuration for Llama-family decoders, read from a Hugging Face ``config.json``.

One dataclass covers Llama 2/3, Mistral and Qwen2: they differ only in a few switches
(qkv bias, tied embeddings, rope scaling), so the model code has no per-family branches.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ModelConfigError(ValueError):
    """A config.json that bpo_jax cannot turn into a model."""


def resolve_dtype(name: str | Any) -> Any:
    """Map 'float32' / 'bfloat16' / 'float16' (or a dtype) to a jnp dtype."""
    if not isinstance(name, str):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters plus how to run them (dtypes, remat)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    num_labels: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # How to run it (not part of the checkpoint):
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        # Hashable fields: the config is static data inside jitted model graphs.
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        resolve_dtype(self.param_dtype)
        resolve_dtype(self.dtype)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (Llama 3 configs list several)."""
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def is_reward_model(self) -> bool:
        return self.architecture.endswith("ForSequenceClassification")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q = self.num_attention_heads * hd
        kv = self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        if self.is_reward_model:
            head = self.num_labels * h
        return self.num_hidden_layers * per_layer + embed + head + h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (non-embedding matmuls + head) plus the attention term.

        The attention term is 6 * 2 * layers * seq_len * (heads * head_dim) / 2 for a causal mask
        (QK^T and AV, forward + backward, half the square on average).
        """
        n_matmul = self.num_params() - self.vocab_size * self.hidden_size
        if self.tie_word_embeddings and not self.is_reward_model:
            n_matmul += self.vocab_size * self.hidden_size  # the tied head is still a matmul
        attn = 6 * 2 * self.num_hidden_layers * seq_len * self.num_attention_heads * self.head_dim / 2
        return 6.0 * n_matmul + attn

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json content for this architecture."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type in ("llama",):
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        if self.is_reward_model:
            d["num_labels"] = self.num_labels
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **run_options: Any) -> "ModelConfig":
        """Build from a parsed Hugging Face config; `run_options` sets dtype/param_dtype/remat."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"{source}: field 'architectures' is {archs!r}; bpo_jax supports "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: field 'hidden_act' is {d['hidden_act']!r}; only 'silu' is supported")
        model_type = SUPPORTED_ARCHITECTURES[arch]
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int):
                raise ModelConfigError(f"{source}: field {key!r} is missing or not an integer")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if model_type == "qwen2":
            attention_bias = True  # Qwen2 always has q/k/v biases and no o bias.
            if d.get("use_sliding_window"):
                raise ModelConfigError(f"{source}: field 'use_sliding_window' is true; sliding windows are not supported")
        else:
            attention_bias = bool(d.get("attention_bias", False))
        rope_theta, rope_scaling = rope_settings(d)
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ModelConfigError(
                    f"{source}: field 'rope_scaling' has type {kind!r}; supported: 'llama3', 'linear', 'default'"
                )
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            architecture=arch,
            model_type=model_type,
            num_labels=int(d.get("num_labels", 1 if arch.endswith("ForSequenceClassification") else 0)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            **run_options,
        )

    @classmethod
    def from_file(cls, path: str | Path, **run_options: Any) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: model config not found (expected a Hugging Face config.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path), **run_options)


def rope_settings(d: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config spelling: transformers < 5 writes top-level
    `rope_theta` + `rope_scaling`; transformers >= 5 writes one `rope_parameters` dict holding both
    (rope_type "default" meaning no scaling)."""
    params = d.get("rope_parameters")
    if params is None:
        return float(d.get("rope_theta", 10000.0)), d.get("rope_scaling")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0))), scaling


def rope_inverse_frequencies(config: ModelConfig) -> "jnp.ndarray":
    """Inverse rotary frequencies, with Llama 3 / linear scaling applied as Hugging Face does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rs = config.rope_scaling_dict
    if not rs:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return inv_freq / float(rs["factor"])
    if kind == "llama3":
        factor = float(rs["factor"])
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_len = float(rs["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq
