"""Reward scoring of sampled responses: a reward model, a rule (a Python function), or rewards given.

- Reward model: a ``*ForSequenceClassification`` checkpoint (backbone + scalar score head) and
  its tokenizer. It sees what a transformers user would feed it: for a conversation, the chat
  template rendering of prompt + response messages; for plain text, prompt + response encoded
  with the tokenizer's special tokens. The score is read at the last real token (texts longer than
  `max_length` keep their last tokens, where the score is read). Batches are sharded over the
  data axis of the mesh, padded to power-of-two length buckets so XLA compiles a few shapes.
- Rule: ``"module:function"`` imported with importlib and called on batches as
  ``fn(prompts, responses) -> list[float]``; prompts are the records' prompts (a string, or the
  list of chat messages), responses are strings (for conversations, the assistant's text).
- Precomputed: the input already holds rewards; they are validated and passed through.

Whatever the source, every reward is checked (one per response, finite) and a bad one is
reported with the scorer's name and the record id.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from bpo_jax.data.readers import ReadReport, raw_rows, records_from_rows
from bpo_jax.data.schema import ScoredGroup, Text
from bpo_jax.data.tokenize import RaggedTokens, encode_prompts
from bpo_jax.distributed import share
from bpo_jax.models.hf import load_hf_model
from bpo_jax.models.llama import CausalLM
from bpo_jax.resumable import ResumableJsonl, check_unique_ids
from bpo_jax.sampling import (
    bucket_length,
    data_shards,
    default_mesh,
    keep_last,
    pad_tokens,
    params_on_mesh,
    to_global,
    to_host,
)
from bpo_jax.sharding import batch_sharding, param_sharding
from bpo_jax.tokenizer import Tokenizer

REWARD_KINDS = ("model", "rule", "precomputed", "gym")


class RewardError(ValueError):
    """A reward source that cannot be used or returned bad values; names the source and record."""


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    kind: str = "model"  # model | rule | precomputed (rewards already in the input file) | gym
    model_path: str | None = None  # reward model directory (ForSequenceClassification + tokenizer files)
    rule: str | None = None  # "module:function" for kind = rule
    gym_task: str | None = None  # reasoning-gym task name for kind = gym (see bpo_jax.gym_reward)
    gym_config: dict | None = None  # its reasoning_gym.create_dataset options (size, seed, ...)
    batch_size: int = 16  # sequences per reward-model batch / responses per rule call
    max_length: int = 0  # > 0: reward-model inputs keep their last max_length tokens
    label: int | str | None = None  # the head output that is the reward (id2label name or index); None: the only one
    dtype: str = "float32"  # reward-model compute dtype

    def __post_init__(self) -> None:
        if self.kind not in REWARD_KINDS:
            raise RewardError(f"rewards.kind: {self.kind!r} is not one of {REWARD_KINDS}")
        if self.kind == "model" and not self.model_path:
            raise RewardError("rewards.model_path: required when rewards.kind is 'model'")
        if self.kind == "rule" and not self.rule:
            raise RewardError("rewards.rule: required when rewards.kind is 'rule' (a 'module:function')")
        if self.kind == "gym" and not self.gym_task:
            raise RewardError("rewards.gym_task: required when rewards.kind is 'gym' (a reasoning-gym task name)")
        if self.batch_size < 1:
            raise RewardError(f"rewards.batch_size: must be >= 1, got {self.batch_size}")


@dataclasses.dataclass
class RewardScorer:
    """A named batch reward function with validation: (prompts, responses) -> float64 [N]."""

    name: str
    fn: Callable[[list[Text], list[Text]], Sequence[float]]
    batch_size: int | None  # items per fn call; None: all at once (fn batches itself)

    def __call__(self, prompts: Sequence[Text], responses: Sequence[Text], labels: Sequence[str] | None = None) -> np.ndarray:
        """Rewards for each (prompt, response); `labels[i]` names item i in error messages."""
        out = np.zeros(len(responses), np.float64)
        step = self.batch_size or max(len(responses), 1)
        for start in range(0, len(responses), step):
            stop = min(start + step, len(responses))
            values = self.fn(list(prompts[start:stop]), list(responses[start:stop]))
            out[start:stop] = _checked(values, stop - start, self.name, (labels or [])[start:stop])
        return out


def _checked(values: Any, expected: int, name: str, labels: Sequence[str]) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name}: returned values that are not numbers ({e})") from None
    if array.shape != (expected,):
        raise RewardError(f"reward {name}: returned shape {array.shape} for {expected} responses (one float each expected)")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        i = int(bad[0])
        where = labels[i] if i < len(labels) else f"item {i} of the batch"
        raise RewardError(f"reward {name}: non-finite reward {array[i]} for {where} ({len(bad)} in this batch)")
    return array


# -- reward model --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames="graphdef")
def _scores(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).rewards(ids, mask)


def reward_label_index(model: CausalLM, label: int | str | None) -> int:
    """Which output of a classification head is the reward: `label` names it (an id2label name
    or an index); None is allowed only for a one-label head (`reward.label` in the run config)."""
    c = model.config
    if not c.is_reward_model:
        raise RewardError(
            f"reward model: architecture {c.architecture} with num_labels={c.num_labels}; "
            "a scalar reward needs a *ForSequenceClassification checkpoint"
        )
    names = c.label_names or tuple(f"LABEL_{i}" for i in range(c.num_labels))
    if label is None and c.num_labels == 1:
        return 0
    if isinstance(label, int) and 0 <= label < c.num_labels:
        return label
    if isinstance(label, str) and label in names:
        return names.index(label)
    raise RewardError(
        f"reward.label: {label!r} does not pick one of the reward model's {c.num_labels} labels "
        f"{list(names)}; set it to a label name or an index 0..{c.num_labels - 1}"
    )


def score_tokens(
    model: CausalLM,
    seqs: Sequence[Sequence[int]] | RaggedTokens,
    batch_size: int,
    mesh: Mesh | None = None,
    *,
    max_length: int = 0,
    label: int | str | None = None,
) -> np.ndarray:
    """Reward-model scores (float32 [N]) of token sequences, batched and sharded over the data
    axis; `label` picks the head output of a multi-label model (see reward_label_index)."""
    column = reward_label_index(model, label)
    seqs = keep_last(seqs if isinstance(seqs, RaggedTokens) else RaggedTokens.from_lists(seqs), max_length)
    mesh = mesh or default_mesh()
    graphdef, state = nnx.split(model)
    state = params_on_mesh(state, mesh)
    rows = -(-batch_size // data_shards(mesh)) * data_shards(mesh)
    order = np.argsort(-seqs.lengths, kind="stable")  # similar lengths share a bucket
    out = np.zeros(len(seqs), np.float32)
    for start in range(0, len(seqs), rows):
        sel = order[start : start + rows]
        ids, mask = pad_tokens(seqs.take(sel), bucket_length(seqs.lengths[sel].max()), "right")
        filler = ((0, rows - len(sel)), (0, 0))
        placed = [to_global(np.pad(a, filler), batch_sharding(mesh, 2)) for a in (ids, mask)]
        out[sel] = to_host(_scores(graphdef, state, *placed))[: len(sel), column]
    return out


def reward_model_inputs(prompts: Sequence[Text], responses: Sequence[Text], tokenizer: Tokenizer) -> RaggedTokens:
    """Token ids the reward model scores: the rendered conversation, or prompt + response text."""
    texts, rendered = [], []
    for prompt, response in zip(prompts, responses):
        if isinstance(prompt, list):
            messages = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
            texts.append(tokenizer.apply_chat_template(list(prompt) + list(messages), add_generation_prompt=False))
            rendered.append(True)
        else:
            texts.append(prompt + response)
            rendered.append(False)
    return encode_prompts(texts, rendered, tokenizer)


def model_scorer(
    model: CausalLM,
    tokenizer: Tokenizer,
    batch_size: int,
    mesh: Mesh | None = None,
    *,
    max_length: int = 0,
    name: str = "model",
    label: int | str | None = None,
) -> RewardScorer:
    """A scorer running `model`'s score head (output `label`) over tokenized prompt + response."""
    reward_label_index(model, label)  # a wrong label fails before any scoring

    def fn(prompts: list[Text], responses: list[Text]) -> np.ndarray:
        ids = reward_model_inputs(prompts, responses, tokenizer)
        return score_tokens(model, ids, batch_size, mesh, max_length=max_length, label=label)

    # score_tokens batches (and length-sorts) a whole chunk itself.
    return RewardScorer(f"model {name}", fn, batch_size=None)


def score_with_model(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Text],
    responses: Sequence[Text],
    batch_size: int,
    mesh: Mesh | None = None,
    *,
    max_length: int = 0,
    label: int | str | None = None,
) -> np.ndarray:
    """Reward-model scores of each (prompt, response) pair, float64 [N]."""
    return model_scorer(model, tokenizer, batch_size, mesh, max_length=max_length, label=label)(prompts, responses)


# -- rule rewards --------------------------------------------------------------------------------
def load_rule(spec: str) -> Callable[..., Sequence[float]]:
    """Import "module:function" (the function may be a dotted attribute path: "mod:Class.method")."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"rule reward {spec!r}: expected 'module:function', e.g. 'my_rewards:exact_match'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code
        raise RewardError(f"rule reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    try:
        fn = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise RewardError(f"rule reward {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise RewardError(f"rule reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def rule_scorer(spec: str, batch_size: int) -> RewardScorer:
    """A scorer calling the rule function on batches; responses are passed as strings."""
    rule = load_rule(spec)

    def fn(prompts: list[Text], responses: list[Text]) -> Sequence[float]:
        texts = [r if isinstance(r, str) else r[-1]["content"] for r in responses]
        try:
            return rule(prompts, texts)
        except Exception as e:  # user code: say whose exception it is
            raise RewardError(f"rule reward {spec}: raised {type(e).__name__}: {e}") from e

    return RewardScorer(f"rule {spec}", fn, batch_size)


def build_scorer(cfg: RewardConfig, mesh: Mesh | None = None) -> RewardScorer | None:
    """The scorer a config asks for (None = precomputed rewards); loads the reward model if needed."""
    if cfg.kind == "precomputed":
        return None
    if cfg.kind == "rule":
        return rule_scorer(cfg.rule, cfg.batch_size)
    if cfg.kind == "gym":
        from bpo_jax.gym_reward import gym_scorer  # imports this module; reasoning-gym is optional

        return gym_scorer(cfg.gym_task, cfg.gym_config, cfg.batch_size)
    shardings = param_sharding(mesh) if mesh is not None else None
    model = load_hf_model(cfg.model_path, dtype=cfg.dtype, shardings=shardings)
    tokenizer = Tokenizer.from_pretrained(cfg.model_path)
    return model_scorer(model, tokenizer, cfg.batch_size, mesh, max_length=cfg.max_length, name=cfg.model_path, label=cfg.label)


# -- the pipeline stage --------------------------------------------------------------------------
def read_groups(path: str | Path, with_rewards: bool) -> list[ScoredGroup]:
    """Response groups {id, prompt, responses, truncated?[, rewards]} of a JSONL/Parquet file.

    Without `with_rewards` the file's rewards (if any) are ignored: they are about to be replaced.
    """
    def rows() -> Iterator[tuple[str, int, Any]]:
        for where, index, row in raw_rows(path):
            if not with_rewards and isinstance(row, dict) and isinstance(row.get("responses"), list):
                row = {**row, "rewards": [0.0] * len(row["responses"])}  # placeholder, validated shape
            yield where, index, row

    return list(records_from_rows(rows(), "scored", False, ReadReport(str(path))))


def score_stage(
    responses_path: str | Path,
    out_path: str | Path,
    scorer: RewardScorer | None,
    *,
    chunk_size: int = 64,
    progress: bool = True,
) -> int:
    """Score every group of a responses file into {id, prompt, responses, rewards, truncated}, resumably.

    `scorer` None passes the file's own rewards through (validated). Groups are written in chunks
    of `chunk_size`; a rerun skips ids already scored. Returns the number of groups scored now (by
    this process: multi-host, each process scores its share of the prompts, bpo_jax.distributed).
    """
    groups = read_groups(responses_path, with_rewards=scorer is None)
    check_unique_ids([g.id for g in groups], str(responses_path))
    out = ResumableJsonl(out_path, {"stage": "score", "scorer": scorer.name if scorer else "precomputed"})
    done = out.done_ids()
    pending = [groups[i] for i in share(len(groups)) if groups[i].id not in done]
    bar = tqdm(total=len(pending), desc="scoring", unit="prompt", disable=not progress or jax.process_index() != 0)
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start : start + chunk_size]
        if scorer is not None:
            counts = [len(g.responses) for g in chunk]
            rewards = scorer(
                [g.prompt for g in chunk for _ in g.responses],
                [r for g in chunk for r in g.responses],
                [f"id={g.id} responses[{i}]" for g in chunk for i in range(len(g.responses))],
            )
            chunk = [dataclasses.replace(g, rewards=r.tolist()) for g, r in zip(chunk, np.split(rewards, np.cumsum(counts)[:-1]))]
        out.write_chunk(g.to_dict() for g in chunk)
        bar.update(len(chunk))
    bar.close()
    out.finalize([g.id for g in groups])
    return len(pending)
