"""Tokenize preference pairs: prompt and responses separately, TRL-style truncation, ragged storage.

Token layout of one example (what batching concatenates and the DPO loss masks):
- prompt: a plain string is encoded with `add_special_tokens=True` (BOS if the tokenizer's
  post-processor adds one); a conversation is rendered with the chat template and
  `add_generation_prompt=True`, then encoded with `add_special_tokens=False` (the template writes
  its own BOS, as in `transformers`).
- response: encoded with `add_special_tokens=False` (never a BOS in the middle), then EOS appended
  (once: a response text that already ends with the EOS token keeps just that one).
  For a conversation the response is the final assistant message's content; turns before it
  (e.g. assistant, user, assistant) are rendered with the template as the text that continues the
  prompt, so they are part of the response and of its loss.

Truncation (TRL's rule): if prompt + the longer response exceeds `max_length`, the prompt is cut
to `max_prompt_length` keeping its END (the question next to the answer); then each response is
cut to `max_length - len(prompt)` keeping its START. Chosen and rejected keep their own lengths.
An example whose response has no room left is dropped. All of it is counted in `TokenizeReport`.
Everything after encoding is offset arithmetic on flat arrays (no per-example Python).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from bpo_jax.data.schema import DataError, PreferencePair, Text
from bpo_jax.tokenizer import Tokenizer, TokenizerError


@dataclass(frozen=True)
class RaggedTokens:
    """Variable-length token sequences: sequence i is `flat[starts[i] : starts[i] + lengths[i]]`."""

    flat: np.ndarray  # int32 [total]
    starts: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int64 [n]

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]], append: int | None = None) -> "RaggedTokens":
        """Pack lists of ids; `append` (e.g. EOS) is added to the end of every sequence."""
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
        if append is not None:
            flat = np.insert(flat, np.cumsum(lengths), np.int32(append))
            lengths = lengths + 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(flat, starts, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.starts[i] : self.starts[i] + self.lengths[i]]

    def take(self, index: np.ndarray) -> "RaggedTokens":
        """A subset/reordering; shares `flat`."""
        return RaggedTokens(self.flat, self.starts[index], self.lengths[index])

    def keep_last(self, n: np.ndarray) -> "RaggedTokens":
        """Keep at most the last n[i] tokens of each sequence."""
        new = np.minimum(self.lengths, n)
        return RaggedTokens(self.flat, self.starts + self.lengths - new, new)

    def keep_first(self, n: np.ndarray) -> "RaggedTokens":
        """Keep at most the first n[i] tokens of each sequence."""
        return RaggedTokens(self.flat, self.starts, np.minimum(self.lengths, np.maximum(n, 0)))

    def to_lists(self) -> list[list[int]]:
        return [self[i].tolist() for i in range(len(self))]


@dataclass(frozen=True)
class TokenizedPairs:
    """The tokenized training set: what `PreferenceBatcher` turns into DPO batches."""

    prompt: RaggedTokens
    chosen: RaggedTokens
    rejected: RaggedTokens
    ids: np.ndarray  # str [n], the pairs' ids
    source_index: np.ndarray  # int64 [n], position of each example in the input pair list
    max_length: int
    pad_id: int
    ref_chosen_logps: np.ndarray | None = None  # float32 [n]
    ref_rejected_logps: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def seq_lengths(self) -> np.ndarray:
        """Longest of prompt+chosen and prompt+rejected per example (what a batch must fit)."""
        return self.prompt.lengths + np.maximum(self.chosen.lengths, self.rejected.lengths)

    def with_ref_logps(self, chosen: np.ndarray, rejected: np.ndarray) -> "TokenizedPairs":
        """Attach precomputed reference log-probs (computed on exactly these truncated tokens)."""
        chosen = np.asarray(chosen, dtype=np.float32)
        rejected = np.asarray(rejected, dtype=np.float32)
        for name, a in (("ref_chosen_logps", chosen), ("ref_rejected_logps", rejected)):
            if a.shape != (len(self),):
                raise ValueError(f"{name}: expected shape ({len(self)},), got {a.shape}")
            if not np.isfinite(a).all():
                raise ValueError(f"{name}: non-finite value at example {int(np.flatnonzero(~np.isfinite(a))[0])}")
        return replace(self, ref_chosen_logps=chosen, ref_rejected_logps=rejected)


@dataclass(frozen=True)
class TokenizeReport:
    """Truncation counts refer to kept examples; responses are counted one by one."""

    n_input: int
    n_examples: int
    n_prompt_truncated: int
    n_response_truncated: int
    n_dropped_empty: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: Tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[TokenizedPairs, TokenizeReport]:
    """Tokenize and truncate pairs (see the module docstring for the exact rules)."""
    if max_length < 1 or (max_prompt_length is not None and max_prompt_length < 1):
        raise ValueError(f"max_length ({max_length}) and max_prompt_length ({max_prompt_length}) must be >= 1")
    prompt_texts = [render_prompt(p.prompt, tokenizer, p.id) for p in pairs]
    prompt = encode_prompts(prompt_texts, [p.conversational for p in pairs], tokenizer)
    chosen = _encode_responses(
        [response_text(p.prompt, p.chosen, tokenizer, t, p.id, "chosen") for p, t in zip(pairs, prompt_texts)],
        tokenizer,
    )
    rejected = _encode_responses(
        [response_text(p.prompt, p.rejected, tokenizer, t, p.id, "rejected") for p, t in zip(pairs, prompt_texts)],
        tokenizer,
    )

    too_long = prompt.lengths + np.maximum(chosen.lengths, rejected.lengths) > max_length
    prompt_cap = prompt.lengths if max_prompt_length is None else np.where(too_long, max_prompt_length, prompt.lengths)
    prompt_cut = prompt.lengths > prompt_cap
    prompt = prompt.keep_last(prompt_cap)
    room = max_length - prompt.lengths
    chosen_cut, rejected_cut = chosen.lengths > room, rejected.lengths > room
    chosen, rejected = chosen.keep_first(room), rejected.keep_first(room)

    keep = (chosen.lengths > 0) & (rejected.lengths > 0)
    idx = np.flatnonzero(keep)
    data = TokenizedPairs(
        prompt=prompt.take(idx),
        chosen=chosen.take(idx),
        rejected=rejected.take(idx),
        ids=np.array([p.id for p in pairs], dtype=str)[idx],
        source_index=idx.astype(np.int64),
        max_length=max_length,
        pad_id=tokenizer.pad_id,
    )
    report = TokenizeReport(
        n_input=len(pairs),
        n_examples=len(idx),
        n_prompt_truncated=int(prompt_cut[keep].sum()),
        n_response_truncated=int(chosen_cut[keep].sum() + rejected_cut[keep].sum()),
        n_dropped_empty=int((~keep).sum()),
    )
    return data, report


def render_prompt(prompt: Text, tokenizer: Tokenizer, record_id: str = "?") -> str:
    """The prompt as text: itself, or the chat template with the generation prompt appended."""
    if isinstance(prompt, str):
        return prompt
    return _render(tokenizer, prompt, True, record_id, "prompt")


def response_text(
    prompt: Text, response: Text, tokenizer: Tokenizer, rendered_prompt: str, record_id: str = "?", field: str = "response"
) -> str:
    """The text of a response as it continues `rendered_prompt` (EOS not included)."""
    if isinstance(response, str):
        return response
    head = rendered_prompt
    if len(response) > 1:
        head = _render(tokenizer, list(prompt) + response[:-1], True, record_id, field)
        if not head.startswith(rendered_prompt):
            raise DataError(
                f"pair id={record_id}", field, "chat_template",
                "the chat template does not render the earlier turns as a continuation of the prompt",
            )
    return head[len(rendered_prompt):] + response[-1]["content"]


def encode_prompts(texts: Sequence[str], rendered: Sequence[bool], tokenizer: Tokenizer) -> RaggedTokens:
    """Encode prompt texts; `rendered[i]`: text i came from the chat template (no special tokens added)."""
    rendered = np.asarray(rendered, dtype=bool).reshape(len(texts))
    ids: list[list[int]] = [[] for _ in texts]
    for flag in (False, True):
        sel = np.flatnonzero(rendered == flag)
        if len(sel):
            for i, seq in zip(sel, tokenizer.encode_batch([texts[i] for i in sel], add_special_tokens=not flag)):
                ids[i] = seq
    return RaggedTokens.from_lists(ids)


def _encode_responses(texts: Sequence[str], tokenizer: Tokenizer) -> RaggedTokens:
    """Response ids + exactly one EOS: a text that already ends with the EOS token gets no second one."""
    eos = tokenizer.eos_id
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return RaggedTokens.from_lists([ids[:-1] if ids and ids[-1] == eos else ids for ids in encoded], append=eos)


def _render(tokenizer: Tokenizer, messages: list, generation_prompt: bool, record_id: str, field: str) -> str:
    if tokenizer.chat_template is None:  # a tokenizer problem, not a row problem
        raise TokenizerError(
            f"{tokenizer.source}: field 'chat_template' missing; pair id={record_id} is a conversation "
            "and needs a tokenizer with a chat template"
        )
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    except TokenizerError as e:
        raise DataError(f"pair id={record_id}", field, "chat_template", str(e)) from None
