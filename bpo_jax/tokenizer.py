"""Tokenizer loaded from a local Hugging Face directory, without `transformers`.

Reads `tokenizer.json` (the `tokenizers` library does the encoding), `tokenizer_config.json`
(special tokens, chat template) and, when present, `special_tokens_map.json` and
`chat_template.jinja`. Behaviour follows Hugging Face so that token ids match what a model was
trained with:

- BOS/EOS insertion is whatever the tokenizer's post-processor does for
  `encode(text, add_special_tokens=True)`; `add_bos_token` in the config is not consulted.
- `special_tokens_map.json`, when present, overrides the special tokens of `tokenizer_config.json`
  (as `transformers` does).
- The pad token falls back to the EOS token when the tokenizer has none (Llama, GPT-2): padded
  positions are always masked out, so the id that fills them never reaches a loss.
- Chat templates render in a sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`,
  the `raise_exception` / `strftime_now` helpers, a `tojson` filter and the special tokens
  (`bos_token`, `eos_token`, ...) as variables. The rendered text already holds whatever special
  tokens the template writes, so it is encoded with `add_special_tokens=False`.
"""

from __future__ import annotations

import datetime
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from bpo_jax.io_utils import atomic_open, write_json

_SPECIAL_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer directory, file or chat template that cannot be used; names the file and field."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template a model needs."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        source: str = "<tokenizer>",
    ) -> None:
        self._tok = tok
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.bos_id = self._id_of(bos_token, "bos_token") if bos_token is not None else None
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_id = self._id_of(self.pad_token, "pad_token")
        self._template = _compile_template(chat_template, source) if chat_template else None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """Load from a local Hugging Face tokenizer directory (no network access)."""
        directory = Path(directory)
        tok_path = directory / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(f"{tok_path}: file not found (a tokenizer directory needs tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise TokenizerError(f"{tok_path}: not a valid tokenizers file: {e}") from None

        cfg_path = directory / "tokenizer_config.json"
        config = _read_json_object(cfg_path) if cfg_path.is_file() else {}
        specials = {k: _token_content(config.get(k), cfg_path, k) for k in _SPECIAL_FIELDS}
        origin = dict.fromkeys(_SPECIAL_FIELDS, cfg_path)
        map_path = directory / "special_tokens_map.json"
        if map_path.is_file():
            overrides = _read_json_object(map_path)
            for k in _SPECIAL_FIELDS:
                if overrides.get(k) is not None:
                    specials[k] = _token_content(overrides[k], map_path, k)
                    origin[k] = map_path
        if specials["eos_token"] is None:
            raise TokenizerError(
                f"{cfg_path}: field 'eos_token' missing (needed to end responses; "
                "set it in tokenizer_config.json or special_tokens_map.json)"
            )
        for k, token in specials.items():
            if token is not None and tok.token_to_id(token) is None:
                raise TokenizerError(f"{origin[k]}: field '{k}': token {token!r} is not in {tok_path.name}")

        template = _chat_template_from(config, cfg_path)
        jinja_path = directory / "chat_template.jinja"
        if template is None and jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        return cls(tok, chat_template=template, source=str(directory), **specials)

    @classmethod
    def from_tokenizers(
        cls,
        tok: tokenizers.Tokenizer,
        *,
        bos: str | None = None,
        eos: str,
        pad: str | None = None,
        chat_template: str | None = None,
    ) -> "Tokenizer":
        """Wrap an in-memory `tokenizers.Tokenizer` (tests, programmatic construction)."""
        return cls(tok, bos_token=bos, eos_token=eos, pad_token=pad, chat_template=chat_template)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json, the layout `from_pretrained` (and
        transformers' AutoTokenizer) read: e.g. for a tokenizer rebuilt from a GGUF file."""
        directory = Path(directory)
        with atomic_open(directory / "tokenizer.json") as f:
            f.write(self._tok.to_str(pretty=True))
        config = {name: getattr(self, name) for name in _SPECIAL_FIELDS}
        config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=self.chat_template)
        write_json(directory / "tokenizer_config.json", config)
        return directory

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def adds_bos(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS (the post-processor says)."""
        return self.bos_id is not None and self.encode("a", add_special_tokens=True)[:1] == [self.bos_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([list(map(int, s)) for s in batch], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render `messages` with the chat template to text, as `transformers` does (tokenize=False)."""
        if self._template is None:
            raise TokenizerError(
                f"{self.source}: field 'chat_template' missing; conversational data needs a tokenizer "
                "with a chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)"
            )
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        variables.update(kwargs)
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: field 'chat_template': {e}") from None

    def _id_of(self, token: str, field: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.source}: {field} {token!r} is not in the vocabulary")
        return tid


def _compile_template(template: str, source: str) -> jinja2.Template:
    """Compile a chat template the way `transformers` does (sandboxed, trimmed blocks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{source}: field 'chat_template': syntax error on line {e.lineno}: {e.message}") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _token_content(value: Any, path: Path, field: str) -> str | None:
    """A special token is written either as a string or as an AddedToken dict with 'content'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{path}: field '{field}': expected a string or {{'content': ...}}, got {value!r}")


def _chat_template_from(config: dict[str, Any], path: Path) -> str | None:
    """`chat_template` is a string, or a list of {name, template} of which 'default' is used."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(
        f"{path}: field 'chat_template': expected a string or a list with a 'default' entry"
    )
