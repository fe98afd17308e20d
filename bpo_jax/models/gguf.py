"""GGUF import: a llama.cpp model file -> the same CausalLM and Tokenizer the safetensors path gives.

A GGUF file holds everything in one place: hyper-parameters and the tokenizer as metadata under
llama.cpp's key names, and (often quantized) tensors under llama.cpp's tensor names. Import reads
the metadata into a ModelConfig, dequantizes each tensor to float32 with the `gguf` package, and
renames it to the Hugging Face name, so that `bpo_jax.models.hf.load_params` fills the model
exactly as for a safetensors checkpoint (and `save_hf_model` exports it as one).

Two things llama.cpp changes that must be undone, as transformers' GGUF loader does:
- q and k projections of the "llama" architecture are stored with their rows permuted (llama.cpp
  rotates interleaved pairs, Hugging Face rotates the two halves of each head);
- the tokenizer is stored as a vocabulary + merge list + token types, with the pre-tokenizer only
  named (`tokenizer.ggml.pre`); it is rebuilt as a `tokenizers` byte-level BPE whose splitting
  follows llama.cpp's rule for that name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import tokenizers
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from bpo_jax.models.config import ModelConfig, ModelConfigError
from bpo_jax.models.hf import load_params
from bpo_jax.models.llama import CausalLM
from bpo_jax.packaged_assets import resolve_path
from bpo_jax.tokenizer import Tokenizer, TokenizerError

SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor names (per block "blk.N.") -> Hugging Face module names (per "model.layers.N.").
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizers by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp splits text for each.
_GPT2_REGEX_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return _GPT2_REGEX_BYTES


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp: first "\p{N}" (every digit alone), then the GPT-2 regex on what is left.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_REGEX_BYTES])


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2,
    "gpt-2": _gpt2,
    "gpt2": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "llama-bpe": _llama3,
    "llama3": _llama3,
}


class GGUFError(ValueError):
    """A GGUF file bpo_jax cannot import; names the file and the metadata key or tensor."""


class GGUFFile:
    """Typed access to one GGUF file's metadata and tensors (memory-mapped, read lazily)."""

    def __init__(self, path: str | Path):
        self.path = resolve_path(path)  # also "asset:NAME" (bpo_jax.packaged_assets)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file not found")
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, OSError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise GGUFError(f"{self.path}: metadata key {key!r} missing")
        return self.get(key)

    @property
    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: metadata 'general.architecture' is {arch!r}; the GGUF importer supports "
                f"{list(SUPPORTED_ARCHITECTURES)} (Llama-family files: Llama, Mistral, SmolLM)"
            )
        return arch


def open_gguf(source: str | Path | GGUFFile) -> GGUFFile:
    """A GGUFFile for a path (parsing the header costs seconds: pass one file to both loaders)."""
    return source if isinstance(source, GGUFFile) else GGUFFile(source)


# -- model ------------------------------------------------------------------------------------------
def gguf_model_config(gguf: GGUFFile, **run_options: Any) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes (`run_options`: dtype, param_dtype, remat)."""
    arch = gguf.architecture
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    for unsupported in ("rope.scaling.type", "attention.sliding_window", "expert_count"):
        if gguf.has(key(unsupported)) and gguf.get(key(unsupported)) not in (None, "none", 0):
            raise GGUFError(f"{gguf.path}: metadata {key(unsupported)!r} is set; not supported by the GGUF importer")
    if "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(f"{gguf.path}: tensor 'rope_freqs.weight' (rope frequency scaling) is not supported")
    heads = int(gguf.require(key("attention.head_count")))
    hidden = int(gguf.require(key("embedding_length")))
    head_dim = int(gguf.get(key("attention.key_length"), gguf.get(key("rope.dimension_count"), hidden // heads)))
    vocab = gguf.get(key("vocab_size"))
    if vocab is None:
        vocab = len(gguf.require("tokenizer.ggml.tokens"))
    token_id = lambda name: gguf.get(f"tokenizer.ggml.{name}_token_id")  # noqa: E731
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(gguf.require(key("feed_forward_length"))),
        "num_hidden_layers": int(gguf.require(key("block_count"))),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf.get(key("attention.head_count_kv"), heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(gguf.require(key("attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(gguf.get(key("rope.freq_base"), 10000.0)),
        "max_position_embeddings": int(gguf.get(key("context_length"), 2048)),
        # llama.cpp leaves out output.weight when the head is the embedding.
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
    }
    try:
        return ModelConfig.from_hf_dict(hf, source=str(gguf.path), **run_options)
    except ModelConfigError as e:
        raise GGUFError(str(e)) from None


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face tensor name of a llama.cpp tensor name (None: not a model tensor)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (pair i, half j) -> (half j, pair i).

    llama.cpp stores each head's rows as [d0, d_half, d1, d_half+1, ...] (rotating adjacent
    pairs); Hugging Face wants [d0, d1, ..., d_half, ...] (rotating the two halves).
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf_model(
    source: str | Path | GGUFFile,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    shardings: Callable[[tuple, tuple], jax.sharding.Sharding] | None = None,
) -> CausalLM:
    """Load a GGUF file (quantized or not) into a CausalLM, dequantizing tensor by tensor."""
    gguf = open_gguf(source)
    config = gguf_model_config(gguf, dtype=dtype, param_dtype=param_dtype, remat=remat)
    by_hf_name: dict[str, str] = {}
    for name in gguf.tensors:
        target = hf_name(name)
        if target is None:
            raise GGUFError(f"{gguf.path}: tensor {name!r} has no counterpart in {config.architecture}")
        by_hf_name[target] = name
    heads = {"attn_q.weight": config.num_attention_heads, "attn_k.weight": config.num_key_value_heads}

    def read(name: str) -> np.ndarray:
        tensor = gguf.tensors[by_hf_name[name]]
        weight = dequantize(tensor.data, tensor.tensor_type)
        suffix = tensor.name.split(".", 2)[-1]
        if suffix in heads:
            weight = unpermute_rows(weight, heads[suffix])
        return weight

    where = {target: f"{gguf.path} (tensor {name!r})" for target, name in by_hf_name.items()}
    return load_params(config, where, read, source=str(gguf.path), shardings=shardings)


# -- tokenizer ---------------------------------------------------------------------------------------
def gguf_tokenizer(source: str | Path | GGUFFile) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata: byte-level BPE, special tokens, chat template."""
    gguf = open_gguf(source)
    kind = gguf.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(
            f"{gguf.path}: metadata 'tokenizer.ggml.model' is {kind!r}; only byte-level BPE ('gpt2') "
            "tokenizers are rebuilt from GGUF metadata; set model.tokenizer to a directory with tokenizer.json"
        )
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{gguf.path}: metadata 'tokenizer.ggml.pre' is {pre!r}; known: {sorted(PRE_TOKENIZERS)}; "
            "set model.tokenizer to a directory with tokenizer.json"
        )
    tokens: list[str] = list(gguf.require("tokenizer.ggml.tokens"))
    types = list(gguf.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in gguf.require("tokenizer.ggml.merges")]
    # Tokens are spelled in the byte-level alphabet (GPT-2's printable stand-ins for bytes), as
    # in a tokenizer.json, so the vocabulary goes to the BPE model unchanged.
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def special(name: str) -> str | None:
        token_id = gguf.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise TokenizerError(f"{gguf.path}: metadata 'tokenizer.ggml.{name}_token_id' = {token_id} is outside the vocabulary")
        return tokens[token_id]

    bos, eos = special("bos"), special("eos")
    if eos is None:
        raise TokenizerError(f"{gguf.path}: metadata 'tokenizer.ggml.eos_token_id' missing (needed to end responses)")
    tok.post_processor = _post_processor(
        bos if gguf.get("tokenizer.ggml.add_bos_token", False) else None,
        eos if gguf.get("tokenizer.ggml.add_eos_token", False) else None,
        tok,
    )
    return Tokenizer(
        tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=special("padding"),
        unk_token=special("unknown"),
        chat_template=gguf.get("tokenizer.chat_template"),
        source=str(gguf.path),
    )


def _post_processor(bos: str | None, eos: str | None, tok: tokenizers.Tokenizer) -> processors.PostProcessor | None:
    """BOS/EOS insertion as the file's add_bos_token / add_eos_token flags ask (None: none)."""
    if bos is None and eos is None:
        return None
    single = " ".join(filter(None, [bos and f"{bos}:0", "$A:0", eos and f"{eos}:0"]))
    pair = " ".join(filter(None, [single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1"]))
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys(filter(None, [bos, eos]))]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
