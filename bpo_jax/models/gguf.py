"""GGUF import: a llama.cpp model file -> the same CausalLM and Tokenizer the safetensors path gives.

A GGUF file holds everything in one place: hyper-parameters and the tokenizer as metadata under
llama.cpp's key names, and (often quantized) tensors under llama.cpp's tensor names. Import reads
the metadata into a ModelConfig, dequantizes each tensor to float32 with the `gguf` package, and
renames it to the Hugging Face name, so that `bpo_jax.models.hf.load_params` fills the model
exactly as for a safetensors checkpoint (and `save_hf_model` exports it as one).

Architectures: "llama" (Llama, Mistral, SmolLM) and "gemma3" (Gemma 3 text), one `GGUFArch` row
each. What llama.cpp changes must be undone, as transformers' GGUF loader does:
- q and k projections of the "llama" architecture are stored with their rows permuted (llama.cpp
  rotates interleaved pairs, Hugging Face rotates the two halves of each head);
- Gemma's norm weights are stored as 1 + w (the scale the norm applies), Hugging Face keeps w;
- a byte-level BPE tokenizer is stored as a vocabulary + merge list + token types, with the
  pre-tokenizer only named (`tokenizer.ggml.pre`); it is rebuilt as a `tokenizers` byte-level BPE
  whose splitting follows llama.cpp's rule for that name. Gemma's SentencePiece vocabulary
  ("llama" tokenizer model) has no merges: they are rebuilt from the vocabulary, ranked by the
  order of the tokens in the file, as transformers does.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import tokenizers
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from bpo_jax.models.config import ModelConfig, ModelConfigError
from bpo_jax.models.hf import load_params
from bpo_jax.models.llama import CausalLM
from bpo_jax.packaged_assets import resolve_path
from bpo_jax.tokenizer import Tokenizer, TokenizerError

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


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """How one `general.architecture` maps onto bpo_jax's model."""

    hf_architecture: str
    block_tensors: dict[str, str]
    permuted_qk: bool  # llama.cpp's interleaved q/k rows (see unpermute_rows)
    norm_offset: float = 0.0  # stored norm weight = offset + Hugging Face's
    allowed_keys: tuple[str, ...] = ()  # metadata that the generic refusal below must let through


ARCHITECTURES = {
    "llama": GGUFArch("LlamaForCausalLM", _BLOCK_TENSORS, permuted_qk=True),
    "gemma3": GGUFArch(
        "Gemma3ForCausalLM",
        {**_BLOCK_TENSORS, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
         "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
         "attn_k_norm": "self_attn.k_norm"},
        permuted_qk=False,
        norm_offset=1.0,
        allowed_keys=("attention.sliding_window",),
    ),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
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
                f"{list(SUPPORTED_ARCHITECTURES)} (Llama-family files: Llama, Mistral, SmolLM; Gemma 3 text)"
            )
        return arch

    @property
    def arch(self) -> GGUFArch:
        return ARCHITECTURES[self.architecture]


def open_gguf(source: str | Path | GGUFFile) -> GGUFFile:
    """A GGUFFile for a path (parsing the header costs seconds: pass one file to both loaders)."""
    return source if isinstance(source, GGUFFile) else GGUFFile(source)


# -- model ------------------------------------------------------------------------------------------
def gguf_model_config(gguf: GGUFFile, **run_options: Any) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes (`run_options`: dtype, param_dtype, remat)."""
    arch = gguf.architecture
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    for unsupported in ("rope.scaling.type", "attention.sliding_window", "expert_count"):
        if unsupported in gguf.arch.allowed_keys:
            continue
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
        "architectures": [gguf.arch.hf_architecture],
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
    if gguf.has(key("attention.sliding_window")):
        # Gemma 3: the rest (local rope base, layer pattern, query scale) keeps transformers'
        # defaults, as its GGUF loader does.
        hf["sliding_window"] = int(gguf.get(key("attention.sliding_window")))
    try:
        return ModelConfig.from_hf_dict(hf, source=str(gguf.path), **run_options)
    except ModelConfigError as e:
        raise GGUFError(str(e)) from None


def hf_name(gguf_name: str, arch: GGUFArch = ARCHITECTURES["llama"]) -> str | None:
    """The Hugging Face tensor name of a llama.cpp tensor name (None: not a model tensor)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m and m.group(2) in arch.block_tensors:
        return f"model.layers.{m.group(1)}.{arch.block_tensors[m.group(2)]}.{m.group(3)}"
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
    arch = gguf.arch
    for name in gguf.tensors:
        target = hf_name(name, arch)
        if target is None:
            raise GGUFError(f"{gguf.path}: tensor {name!r} has no counterpart in {config.architecture}")
        by_hf_name[target] = name
    heads = {"attn_q.weight": config.num_attention_heads, "attn_k.weight": config.num_key_value_heads}

    def read(name: str) -> np.ndarray:
        tensor = gguf.tensors[by_hf_name[name]]
        weight = dequantize(tensor.data, tensor.tensor_type)
        suffix = tensor.name.split(".", 2)[-1]
        if arch.permuted_qk and suffix in heads:
            weight = unpermute_rows(weight, heads[suffix])
        if arch.norm_offset and tensor.name.endswith("norm.weight"):
            weight = weight - np.float32(arch.norm_offset)
        return weight

    where = {target: f"{gguf.path} (tensor {name!r})" for target, name in by_hf_name.items()}
    return load_params(config, where, read, source=str(gguf.path), shardings=shardings)


# -- tokenizer ---------------------------------------------------------------------------------------
def gguf_tokenizer(source: str | Path | GGUFFile) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata: byte-level BPE or Gemma's SentencePiece
    BPE, special tokens, chat template."""
    gguf = open_gguf(source)
    kind = gguf.require("tokenizer.ggml.model")
    tokens: list[str] = list(gguf.require("tokenizer.ggml.tokens"))
    types = list(gguf.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if kind == "gpt2":
        tok = _byte_level_bpe(gguf, tokens)
    elif kind == "llama" and gguf.get("general.architecture") == "gemma3":
        tok = _gemma_bpe(tokens)
    else:
        raise TokenizerError(
            f"{gguf.path}: metadata 'tokenizer.ggml.model' is {kind!r}; only byte-level BPE ('gpt2') and Gemma 3's "
            "SentencePiece ('llama') tokenizers are rebuilt from GGUF metadata; set model.tokenizer to a directory "
            "with tokenizer.json"
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
    # User-defined tokens the vocabulary spells otherwise (Gemma's whitespace runs) stay BPE pieces.
    vocab = tok.get_vocab()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])

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


def _byte_level_bpe(gguf: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{gguf.path}: metadata 'tokenizer.ggml.pre' is {pre!r}; known: {sorted(PRE_TOKENIZERS)}; "
            "set model.tokenizer to a directory with tokenizer.json"
        )
    merges = [tuple(m.split(" ", 1)) for m in gguf.require("tokenizer.ggml.merges")]
    # Tokens are spelled in the byte-level alphabet (GPT-2's printable stand-ins for bytes), as
    # in a tokenizer.json, so the vocabulary goes to the BPE model unchanged.
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


_SPACE = "\u2581"  # SentencePiece's visible space


def _gemma_bpe(tokens: list[str]) -> tokenizers.Tokenizer:
    """Gemma's SentencePiece vocabulary as a BPE with byte fallback (Hugging Face's GemmaTokenizer).

    The file stores whitespace tokens with real spaces: those are spelled with the SentencePiece
    space again (one per character, as transformers does). It stores no merges: every split of a token into two vocabulary
    tokens is a merge, ranked by the token's position in the file (earlier = applied first; Gemma's
    scores do not follow the merge order), ties by longer left then right part.
    """
    tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for token, index in vocab.items():
        splits = sorted(
            ((token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab),
            key=lambda lr: (vocab[lr[0]], vocab[lr[1]]),
        )
        ranked.extend((index, -len(left), -len(right), left, right) for left, right in splits)
    ranked.sort(key=lambda m: m[:3])  # stable: equal keys keep the per-token order above
    merges = [(left, right) for *_, left, right in ranked]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _post_processor(bos: str | None, eos: str | None, tok: tokenizers.Tokenizer) -> processors.PostProcessor | None:
    """BOS/EOS insertion as the file's add_bos_token / add_eos_token flags ask (None: none)."""
    if bos is None and eos is None:
        return None
    single = " ".join(filter(None, [bos and f"{bos}:0", "$A:0", eos and f"{eos}:0"]))
    pair = " ".join(filter(None, [single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1"]))
    specials = [(t, tok.token_to_id(t)) for t in dict.fromkeys(filter(None, [bos, eos]))]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
