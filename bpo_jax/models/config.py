"""Model configuration for the decoder families bpo_jax runs, read from a Hugging Face ``config.json``.

One dataclass covers Llama 2/3, Mistral, Qwen2, Qwen3 and Gemma 3: they differ only in a few
switches, collected per family in `FAMILIES` (norm style, q/k norms, biases, which layers use a
sliding window, activation), so the model code reads switches and never a family name. What a
family cannot do here is refused on import with the config field that asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "Gemma3TextForSequenceClassification": "gemma3_text",
}
FULL, SLIDING = "full_attention", "sliding_attention"  # Hugging Face's layer_types values


@dataclasses.dataclass(frozen=True)
class Family:
    """How one decoder family departs from Llama (the defaults)."""

    qkv_bias_only: bool = False  # q/k/v always biased and o never (Qwen2); else attention_bias covers all four
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma stores weight - 1
    sandwich_norms: bool = False  # post_attention_layernorm on the attention output, norms around the MLP
    embed_scale: bool = False  # input embeddings times sqrt(hidden_size)
    windows: str = "none"  # sliding layers: none | all (sliding_window) | qwen (use_sliding_window) | layer_types
    act_key: str = "hidden_act"  # the config.json field naming the MLP activation
    default_act: str = "silu"


FAMILIES = {
    "llama": Family(),
    "mistral": Family(windows="all"),
    "qwen2": Family(qkv_bias_only=True, windows="qwen"),
    "qwen3": Family(qk_norm=True, windows="qwen"),
    "gemma3_text": Family(qk_norm=True, norm_offset=1.0, sandwich_norms=True, embed_scale=True,
                          windows="layer_types", act_key="hidden_activation", default_act="gelu_pytorch_tanh"),
}
# MLP activations by their config.json name (Gemma's GeGLU uses the tanh approximation of gelu).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}
DEFAULT_WINDOW = 4096  # transformers' default sliding_window when a config.json leaves the key out
GEMMA_LOCAL_THETA = 10000.0  # transformers' rope base of Gemma 3's sliding layers when none is given

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
    hidden_act: str = "silu"
    sliding_window: int | None = None  # tokens a windowed layer's query sees, itself included
    layer_types: tuple[str, ...] | None = None  # per layer FULL or SLIDING; None: all FULL
    rope_local_theta: float | None = None  # rope base of sliding layers (Gemma 3), unscaled
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (default head_dim)
    label_names: tuple[str, ...] = ()  # id2label of a classification head, in id order
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
        for name in ("layer_types", "label_names"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.model_type not in FAMILIES:
            raise ModelConfigError(f"model_type {self.model_type!r} is not one of {sorted(FAMILIES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ModelConfigError(f"field {self.family.act_key!r} is {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {FULL, SLIDING}:
                raise ModelConfigError(
                    f"field 'layer_types' must list {FULL!r} or {SLIDING!r} for each of the "
                    f"{self.num_hidden_layers} layers, got {list(self.layer_types)}"
                )
            if SLIDING in self.layer_types and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
                raise ModelConfigError(f"field 'sliding_window' is {self.sliding_window!r}; sliding layers need a positive window")
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

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, None for full attention."""
        if self.layer_types is None or self.layer_types[layer] != SLIDING:
            return None
        return self.sliding_window

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q = self.num_attention_heads * hd
        kv = self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * h * i
        norms = (4 if self.family.sandwich_norms else 2) * h + (2 * hd if self.family.qk_norm else 0)
        per_layer = attn + mlp + norms
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
        """The Hugging Face config.json content for this architecture (transformers reloads the
        same model from it: windows, per-layer types and label names included)."""
        fam = self.family
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
            fam.act_key: self.hidden_act,
            "torch_dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if not fam.qkv_bias_only:
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        if fam.windows != "none":
            # Written even when None: transformers would otherwise assume a window of 4096.
            d["sliding_window"] = self.sliding_window
        if fam.windows in ("qwen", "layer_types"):
            d["layer_types"] = list(self.layer_types or [FULL] * self.num_hidden_layers)
        if fam.windows == "qwen":
            d["use_sliding_window"] = self.sliding_window is not None
            sliding = [i for i, t in enumerate(d["layer_types"]) if t == SLIDING]
            d["max_window_layers"] = sliding[0] if sliding else self.num_hidden_layers
        if fam.windows == "layer_types":
            d["rope_local_base_freq"] = self.rope_local_theta
            d["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            d["attn_logit_softcapping"] = None
            d["final_logit_softcapping"] = None
        if self.is_reward_model:
            names = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
            d["id2label"] = {str(i): n for i, n in enumerate(names)}
            d["label2id"] = {n: i for i, n in enumerate(names)}
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
        model_type = SUPPORTED_ARCHITECTURES[arch]
        fam = FAMILIES[model_type]
        act = d.get(fam.act_key) or fam.default_act
        if act not in ACTIVATIONS:
            raise ModelConfigError(f"{source}: field {fam.act_key!r} is {act!r}; supported: {sorted(ACTIVATIONS)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int) or isinstance(d[key], bool):
                raise ModelConfigError(f"{source}: field {key!r} is missing or not an integer")
            if d[key] <= 0:  # a zero-size weight only fails much later (orbax refuses to save it)
                raise ModelConfigError(f"{source}: field {key!r} is {d[key]}; it must be positive")
        # Gemma 2's soft-capping (transformers' Gemma 3 ignores attn_logit_softcapping) and the
        # bidirectional EmbeddingGemma variant.
        for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
            if d.get(key):
                raise ModelConfigError(f"{source}: field {key!r} is {d[key]!r}; not supported")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        # Qwen2 always has q/k/v biases and no o bias.
        attention_bias = True if fam.qkv_bias_only else bool(d.get("attention_bias", False))
        rope_theta, rope_scaling, rope_local_theta = rope_settings(d, source)
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ModelConfigError(
                    f"{source}: field 'rope_scaling' has type {kind!r}; supported: 'llama3', 'linear', 'default'"
                )
        window, layer_types = _windows(d, fam, source)
        num_labels, label_names = _labels(d, arch, source)
        try:
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
                tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type == "gemma3_text")),
                attention_bias=attention_bias,
                mlp_bias=bool(d.get("mlp_bias", False)),
                architecture=arch,
                model_type=model_type,
                num_labels=num_labels,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                hidden_act=act,
                sliding_window=window,
                layer_types=layer_types,
                rope_local_theta=(rope_local_theta or GEMMA_LOCAL_THETA) if fam.windows == "layer_types" else None,
                query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if fam.windows == "layer_types" else None,
                label_names=label_names,
                **run_options,
            )
        except ModelConfigError as e:
            raise ModelConfigError(f"{source}: {e}") from None

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


def rope_settings(d: dict[str, Any], source: str = "config.json") -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling, local rope_theta) from either config spelling: transformers < 5
    writes top-level `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`);
    transformers >= 5 writes one `rope_parameters` dict holding both (rope_type "default" meaning
    no scaling), for Gemma 3 one such dict per layer type."""
    params = d.get("rope_parameters")
    local = d.get("rope_local_base_freq")
    if params is not None and FULL in params:
        local_params = params.get(SLIDING) or {}
        if local_params.get("rope_type", "default") != "default":
            raise ModelConfigError(f"{source}: field 'rope_parameters.{SLIDING}' scales rope; not supported")
        local = local_params.get("rope_theta", local)
        params = params[FULL]
    local = None if local is None else float(local)
    if params is None:
        return float(d.get("rope_theta", 10000.0)), d.get("rope_scaling"), local
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0))), scaling, local


def _windows(d: dict[str, Any], family: Family, source: str) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) as transformers derives them for the family."""
    n = d["num_hidden_layers"]
    if family.windows == "none" or (family.windows == "qwen" and not d.get("use_sliding_window")):
        return None, None
    window = d.get("sliding_window", DEFAULT_WINDOW)
    if window is None:
        if family.windows == "layer_types":
            raise ModelConfigError(f"{source}: field 'sliding_window' is null; this family's local layers need one")
        return None, None
    if not isinstance(window, int) or window <= 0:
        raise ModelConfigError(f"{source}: field 'sliding_window' is {window!r}; expected a positive integer")
    if family.windows == "all":  # Mistral: every layer (transformers ignores layer_types here)
        return window, (SLIDING,) * n
    types = d.get("layer_types")
    if types is None and family.windows == "qwen":
        first = d.get("max_window_layers", 28)
        types = [SLIDING if i >= first else FULL for i in range(n)]
    elif types is None:  # Gemma 3: every `sliding_window_pattern`-th layer is global
        pattern = d.get("sliding_window_pattern", 6)
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    return window, tuple(types)


def _labels(d: dict[str, Any], arch: str, source: str) -> tuple[int, tuple[str, ...]]:
    """(num_labels, label names) of a classification head: transformers 5 writes only id2label."""
    if not arch.endswith("ForSequenceClassification"):
        return 0, ()
    id2label = d.get("id2label") or {}
    try:
        names = tuple(id2label[k] for k in sorted(id2label, key=int))
    except ValueError:
        raise ModelConfigError(f"{source}: field 'id2label' has keys that are not integers: {sorted(id2label)}") from None
    if names and [int(k) for k in sorted(id2label, key=int)] != list(range(len(names))):
        raise ModelConfigError(f"{source}: field 'id2label' must number labels 0..{len(names) - 1}")
    num = d.get("num_labels", len(names) or 1)
    if names and num != len(names):
        raise ModelConfigError(f"{source}: field 'num_labels' is {num} but 'id2label' names {len(names)} labels")
    return int(num), names


def rope_inverse_frequencies(config: ModelConfig, local: bool = False) -> "jnp.ndarray":
    """Inverse rotary frequencies, with Llama 3 / linear scaling applied as Hugging Face does.

    `local`: those of sliding-window layers, which in Gemma 3 have their own base and no scaling.
    """
    dim = config.head_dim
    theta = config.rope_local_theta if local and config.rope_local_theta is not None else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    rs = config.rope_scaling_dict
    if not rs or (local and config.rope_local_theta is not None):
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
