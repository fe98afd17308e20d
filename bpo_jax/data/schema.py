"""One schema for the three record kinds that flow between the pipeline stages.

- prompts:        {id?, prompt}
- scored groups:  {id?, prompt, responses: [...], rewards: [...], truncated?: [bool]}
- pairs:          {id?, prompt, chosen, rejected, meta?}

A text field is either a plain string or a conversation: a list of {"role", "content"} messages
(rendered with the tokenizer's chat template only at tokenization time). Within one record the
prompt decides: a plain-string prompt needs plain-string responses; with a conversational prompt
each response is a list of messages ending in an assistant turn, and a bare string response is
taken as one assistant message.

Pairs without a "prompt" field are TRL's "implicit prompt" format: chosen and rejected hold the
whole text/conversation and share a prefix, which is split off as the prompt (`split_implicit_prompt`).

Every record gets a stable `id`: the one given in the row, else `<hash>-<row>` where hash is the
first 10 hex digits of SHA-256 of the prompt (`prompt_key`) and row is the 0-based line number
(JSONL) or row number (Parquet) in the file, so re-reading the same file gives the same ids and
equal prompts share the hash part.

Bad rows raise `DataError` with one message naming where (file:line), the field and the problem;
`reason` is a short category used to count skipped rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Message = dict[str, str]
Text = Union[str, list[Message]]
Kind = Literal["prompts", "scored", "pairs"]
KINDS: tuple[str, ...] = ("prompts", "scored", "pairs")


class DataError(ValueError):
    """A bad data row or file: `where` is 'file:line', `field` the offending field, `reason` a category."""

    def __init__(self, where: str, field: str | None, reason: str, detail: str) -> None:
        self.where, self.field, self.reason, self.detail = where, field, reason, detail
        named = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{named} {detail}")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: Text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScoredGroup:
    """n responses to one prompt with their rewards (`truncated[i]`: response i hit the length cap)."""

    id: str
    prompt: Text
    responses: list[Text]
    rewards: list[float]
    truncated: list[bool] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.truncated is None:
            del d["truncated"]
        return d


@dataclass(frozen=True)
class PreferencePair:
    id: str
    prompt: Text
    chosen: Text
    rejected: Text
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Record = Union[PromptRecord, ScoredGroup, PreferencePair]


def prompt_key(prompt: Text) -> str:
    """Canonical string of a prompt: equal prompts (string or conversation) give equal keys."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def derive_id(prompt: Text, row: int) -> str:
    """The id of a row that has none: short hash of the prompt plus the 0-based row number."""
    digest = hashlib.sha256(prompt_key(prompt).encode("utf-8")).hexdigest()[:10]
    return f"{digest}-{row}"


def infer_kind(row: dict[str, Any]) -> Kind:
    """Which record kind a raw row is, from its fields."""
    if "responses" in row:
        return "scored"
    if "chosen" in row or "rejected" in row:
        return "pairs"
    return "prompts"


def parse_record(row: Any, kind: Kind, row_index: int, where: str) -> Record:
    """Validate and normalize one raw row (a decoded JSON object / Parquet row) into a record."""
    if not isinstance(row, dict):
        raise DataError(where, None, "not_object", f"expected a JSON object, got {type(row).__name__}")
    if kind == "prompts":
        prompt = _text(row, "prompt", where)
        return PromptRecord(_id(row, prompt, row_index, where), prompt)
    if kind == "scored":
        return _parse_scored(row, row_index, where)
    if kind == "pairs":
        return _parse_pair(row, row_index, where)
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")


def split_implicit_prompt(chosen: Text, rejected: Text, where: str = "<pair>") -> tuple[Text, Text, Text]:
    """Split TRL implicit-prompt pairs (full texts sharing a prefix) into (prompt, chosen, rejected).

    Conversations: the shared leading messages are the prompt, cut back so that it does not end
    with an assistant turn; the remaining messages (the differing assistant turn(s)) are responses.
    Strings: the longest common prefix is cut back to a word boundary (unless both texts continue
    with whitespace there) and then to the start of its trailing whitespace, so the responses keep
    their leading whitespace (" Paris" tokenizes as it would after the prompt).
    """
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(where, "rejected", "wrong_type", "chosen and rejected must both be strings or both conversations")
    if isinstance(chosen, list):
        p = 0
        while p < min(len(chosen), len(rejected)) and chosen[p] == rejected[p]:
            p += 1
        while p > 0 and chosen[p - 1]["role"] == "assistant":
            p -= 1
        prompt, c, r = chosen[:p], chosen[p:], rejected[p:]
    else:
        p = len(_common_prefix(chosen, rejected))
        word_ends_here = p < min(len(chosen), len(rejected)) and chosen[p].isspace() and rejected[p].isspace()
        while not word_ends_here and p > 0 and not chosen[p - 1].isspace():
            p -= 1
        while p > 0 and chosen[p - 1].isspace():
            p -= 1
        prompt, c, r = chosen[:p], chosen[p:], rejected[p:]
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise DataError(where, "prompt", "no_shared_prompt", "no 'prompt' field and chosen/rejected share no leading prompt")
    for name, value in (("chosen", c), ("rejected", r)):
        if not value or _is_blank(value):
            raise DataError(where, name, "empty", "empty after splitting off the shared prompt")
    return prompt, c, r


def _parse_pair(row: dict[str, Any], row_index: int, where: str) -> PreferencePair:
    if row.get("prompt") is None and "chosen" in row and "rejected" in row:
        chosen = _text(row, "chosen", where)
        rejected = _text(row, "rejected", where)
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, where)
        _check_response(chosen, "chosen", where)
        _check_response(rejected, "rejected", where)
    else:
        prompt = _text(row, "prompt", where)
        chosen = _response(row.get("chosen"), prompt, "chosen", where)
        rejected = _response(row.get("rejected"), prompt, "rejected", where)
    meta = row.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise DataError(where, "meta", "wrong_type", f"expected an object, got {type(meta).__name__}")
    return PreferencePair(_id(row, prompt, row_index, where), prompt, chosen, rejected, meta)


def _parse_scored(row: dict[str, Any], row_index: int, where: str) -> ScoredGroup:
    prompt = _text(row, "prompt", where)
    responses = _list(row, "responses", where)
    if not responses:
        raise DataError(where, "responses", "empty", "no responses")
    responses = [_response(r, prompt, f"responses[{i}]", where) for i, r in enumerate(responses)]
    rewards = _list(row, "rewards", where)
    if len(rewards) != len(responses):
        raise DataError(
            where, "rewards", "length_mismatch", f"{len(rewards)} rewards for {len(responses)} responses"
        )
    for i, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise DataError(where, f"rewards[{i}]", "wrong_type", f"expected a number, got {r!r}")
        try:
            finite = math.isfinite(r)
        except OverflowError:  # an integer beyond the float range
            raise DataError(where, f"rewards[{i}]", "non_finite_reward", f"reward {str(r)[:12]}... is too large") from None
        if not finite:
            raise DataError(where, f"rewards[{i}]", "non_finite_reward", f"reward is {r}")
    truncated = row.get("truncated")
    if truncated is not None:
        if not isinstance(truncated, list) or not all(isinstance(t, bool) for t in truncated):
            raise DataError(where, "truncated", "wrong_type", "expected a list of booleans")
        if len(truncated) != len(responses):
            raise DataError(
                where, "truncated", "length_mismatch", f"{len(truncated)} flags for {len(responses)} responses"
            )
    return ScoredGroup(
        _id(row, prompt, row_index, where), prompt, responses, [float(r) for r in rewards], truncated
    )


def _id(row: dict[str, Any], prompt: Text, row_index: int, where: str) -> str:
    given = row.get("id")
    if given is None:
        return derive_id(prompt, row_index)
    if isinstance(given, bool) or not isinstance(given, (str, int)) or given == "":
        raise DataError(where, "id", "wrong_type", f"expected a non-empty string or integer, got {given!r}")
    return str(given)


def _list(row: dict[str, Any], name: str, where: str) -> list[Any]:
    value = row.get(name)
    if value is None:
        raise DataError(where, name, "missing_field", "missing")
    if not isinstance(value, list):
        raise DataError(where, name, "wrong_type", f"expected a list, got {type(value).__name__}")
    return value


def _text(row: dict[str, Any], name: str, where: str) -> Text:
    """A required prompt-like field: non-blank string or a non-blank conversation."""
    value = row.get(name)
    if value is None:
        raise DataError(where, name, "missing_field", "missing")
    if isinstance(value, list):
        value = _messages(value, name, where)
    elif not isinstance(value, str):
        raise DataError(where, name, "wrong_type", f"expected a string or a list of messages, got {type(value).__name__}")
    if _is_blank(value):
        raise DataError(where, name, "empty", "empty")
    return value


def _response(value: Any, prompt: Text, name: str, where: str) -> Text:
    """A response in the prompt's format; a bare string after a conversation is one assistant turn."""
    if value is None:
        raise DataError(where, name, "missing_field", "missing")
    if isinstance(prompt, list) and isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    if isinstance(prompt, str) and not isinstance(value, str):
        raise DataError(where, name, "wrong_type", f"expected a string like 'prompt', got {type(value).__name__}")
    if isinstance(value, list):
        value = _messages(value, name, where)
    elif not isinstance(value, str):
        raise DataError(where, name, "wrong_type", f"expected a string or a list of messages, got {type(value).__name__}")
    _check_response(value, name, where)
    return value


def _check_response(value: Text, name: str, where: str) -> None:
    if isinstance(value, list):
        if not value:
            raise DataError(where, name, "empty", "no messages")
        last = value[-1]
        if last["role"] != "assistant":
            raise DataError(where, f"{name}[{len(value) - 1}].role", "wrong_type", f"a response must end with an assistant message, got {last['role']!r}")
        if not last["content"].strip():
            raise DataError(where, f"{name}[{len(value) - 1}].content", "empty", "empty")
    elif not value.strip():
        raise DataError(where, name, "empty", "empty")


def _messages(value: list[Any], name: str, where: str) -> list[Message]:
    """Validate a conversation; keeps only role and content (the parts chat templates need)."""
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(where, f"{name}[{i}]", "wrong_type", f"expected a message object, got {type(m).__name__}")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise DataError(where, f"{name}[{i}].{key}", "missing_field", "missing")
            if not isinstance(m[key], str):
                raise DataError(where, f"{name}[{i}].{key}", "wrong_type", f"expected a string, got {type(m[key]).__name__}")
        if not m["role"]:
            raise DataError(where, f"{name}[{i}].role", "empty", "empty")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _is_blank(value: Text) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
