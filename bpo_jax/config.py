"""Typed run configuration: one dataclass per section, loaded from YAML, validated before any work.

Every option the pipeline reads is declared here with its default and a trailing one-line comment;
`config_reference_markdown()` turns those comments into the configuration reference, so the
documentation cannot drift from the code.

`load_config(path, overrides)` reads YAML, applies dotted overrides (`train.optim.learning_rate=1e-6`,
values parsed as YAML), checks every key and type against the dataclasses, then `validate` checks
choices, ranges, contradictions, the mesh against a device count, and that input files exist. Any
problem stops the run with one `ConfigError` naming the file, line and dotted key.

Relative paths in a config (model, tokenizer, data files) are resolved against the current working
directory, not the config file's directory: run from the repository root.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import re
import sys
import tokenize
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from bpo_jax.data.readers import is_tfds_reference
from bpo_jax.data.schema import DataError
from bpo_jax.io_utils import atomic_open
from bpo_jax.mesh_shape import MESH_AXES, MeshError, resolve_mesh_shape
from bpo_jax.packaged_assets import AssetNotInstalled, resolve_path
from bpo_jax.pairs import DEFAULT_STRATEGY, parse_strategy

DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant")
REFERENCE_MODES = ("precomputed", "frozen_copy", "lora_off", "none")
REWARD_KINDS = ("rule", "model", "precomputed", "gym")
EMBEDDERS = ("policy", "tfidf", "minilm")
DEPTH_ALLOCATORS = ("gradient", "uniform", "random", "length", "margin", "off")
BASE_PAIRS = ("primary", "ranked")
PROJECTIONS = ("rademacher", "gaussian")
# bpo_jax.losses.LOSS_TYPES, listed here so that a config is checked without loading JAX (a test
# checks that the two agree).
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")


@dataclasses.dataclass
class ModelSection:
    path: str | None = None  # local Hugging Face directory (config.json, *.safetensors, tokenizer.json)
    gguf: str | None = None  # a GGUF file instead of `path`, or "asset:smollm2-135m-instruct" / "asset:gemma3-270m" (installed package)
    init: dict | None = None  # a Hugging Face config dict: build a randomly initialized model instead
    tokenizer: str | None = None  # tokenizer directory when it differs from `path`
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # storage dtype of parameters: float32 | bfloat16 | float16
    remat: bool = False  # rematerialize each decoder layer in the backward pass


@dataclasses.dataclass
class MeshSection:
    data: int = -1  # data-parallel axis; -1: all devices not used by the other axes
    fsdp: int = 1  # fully sharded data-parallel axis (parameters and batch split over it)
    tensor: int = 1  # tensor-parallel axis (projections split over it)


@dataclasses.dataclass
class DistributedSection:
    enabled: bool = False  # call jax.distributed.initialize() (multi-host)
    coordinator_address: str | None = None  # host:port of process 0; None: auto-detect (TPU, SLURM)
    num_processes: int | None = None  # number of processes (hosts); None: auto-detect
    process_id: int | None = None  # this process's index in [0, num_processes); None: auto-detect


@dataclasses.dataclass
class DataSection:
    prompts: str | None = None  # prompts {id?, prompt}; every data file key takes JSONL/Parquet or a TFDS dataset: tfds:NAME or a dataset directory, [SPLIT] optional (default train)
    scored: str | None = None  # scored groups {prompt, responses, rewards}: enter at the pairs stage
    pairs: str | None = None  # preference pairs {prompt, chosen, rejected}: enter at the train stage
    eval_prompts: str | None = None  # held-out prompts for eval
    eval_pairs: str | None = None  # held-out pairs for preference accuracy
    max_length: int = 512  # prompt + response tokens
    max_prompt_length: int = 256  # prompts longer than this keep their end
    length_buckets: tuple[int, ...] = ()  # padded lengths; empty: multiples of 64 up to max_length
    skip_bad_rows: bool = False  # skip and count bad rows instead of stopping with an error


@dataclasses.dataclass
class LoraSection:
    rank: int = 0  # 0: full fine-tuning
    alpha: float = 16.0  # adapter output is scaled by alpha / rank
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # regexes on projection paths


@dataclasses.dataclass
class SftSection:
    enabled: bool = False  # supervised warm-up on demonstrations before sampling
    data: str | None = None  # demonstrations {prompt, response} (JSONL/Parquet or a TFDS dataset, as data.*)
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # demonstrations per step
    learning_rate: float = 1e-3  # peak learning rate (linear warmup, then cosine)
    warmup_steps: int = 10  # linear warmup steps


@dataclasses.dataclass
class SampleSection:
    n: int = 8  # responses sampled per prompt (pairs need >= 2)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]; 1: off
    top_k: int = 0  # keep the k most likely tokens; 0: off
    max_new_tokens: int = 64  # response length limit (responses that hit it count as truncated)
    min_new_tokens: int = 1  # EOS is excluded before this many tokens (1: no empty responses)
    batch_size: int = 16  # prompts per sampling batch
    seed: int | None = None  # sampling PRNG seed; null: the top-level seed


@dataclasses.dataclass
class RewardSection:
    kind: str = "rule"  # rule | model | precomputed | gym
    function: str | None = None  # "module:function", called as f(prompts, responses) -> list of floats, for kind=rule; imported and run: trust a config like code
    model_path: str | None = None  # reward model directory (Hugging Face ...ForSequenceClassification), for kind=model
    label: int | str | None = None  # kind=model: the head output that is the reward (id2label name or index); null: the only one
    gym_task: str | None = None  # reasoning-gym task name, for kind=gym
    gym_config: dict | None = None  # extra reasoning-gym task options
    batch_size: int = 16  # responses scored per batch


@dataclasses.dataclass
class PairsSection:
    strategy: str = DEFAULT_STRATEGY  # "chosen/rejected" points (min, mu-2s, mu-s, mu, mu+s, mu+2s, max), or scalable, max/random, max/second, random/random
    min_margin: float = 0.0  # skip pairs whose reward gap is below this
    k_rej: int = 5  # scalable strategy: rejected = worst of the first k_rej samples
    length_penalty: float = 0.0  # select on reward - length_penalty * response tokens
    exclude_truncated: bool = False  # truncated responses (no EOS) are never chosen
    seed: int | None = None  # seed of the random strategies; null: the top-level seed


@dataclasses.dataclass
class BpoSection:
    breadth_enabled: bool = False  # compress prompts to num_prompts clusters before sampling
    num_prompts: int = 0  # B': prompts kept by breadth compression; 0: keep all
    embedder: str = "policy"  # prompt encoder for breadth: policy | tfidf | minilm
    depth_allocator: str = "gradient"  # gradient | uniform | random | length | margin | off (train on the pairs stage output)
    budget: int = 0  # global pair budget M; 0: half the candidate pairs, at least one per prompt
    base_pair: str = "primary"  # each prompt's guaranteed pair: primary (the pairs.strategy pick) | ranked (allocator's top)
    pairs_per_prompt: int = 0  # uniform balancing: k pairs for every prompt (pairs.strategy's first, then by margin); needs depth_allocator off; 0: off
    candidate_strategies: tuple[str, ...] = (  # candidate pairs built per prompt, one per strategy
        "max/mu-2s",
        "max/min",
        "max/mu-s",
        "mu+s/mu-2s",
        "max/mu",
        "mu+s/min",
        "mu/mu-2s",
    )
    proj_dim: int = 8192  # random projection size of gradient features
    num_clusters: int = 8  # spherical k-means clusters over gradient features
    warmup_steps: int = 0  # DPO steps before gradient features (LESS-style; moves fresh LoRA B off zero)
    feature_batch_size: int = 8  # pairs per vmap(grad) micro-batch
    projection: str = "rademacher"  # random projection entries: rademacher | gaussian
    trainable: str = "lora"  # parameters differentiated for features: lora, or a regex on parameter paths
    seed: int | None = None  # breadth clustering, gradient projection and depth clustering/random seed; null: the top-level seed


@dataclasses.dataclass
class OptimSection:
    learning_rate: float = 5e-6  # peak learning rate
    schedule: str = "cosine"  # cosine | linear | constant (after linear warmup)
    warmup_steps: int = 0  # linear warmup from 0
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only)
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables


@dataclasses.dataclass
class TrainSection:
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge | robust | simpo
    beta: float = 0.1  # DPO temperature (> 0)
    label_smoothing: float = 0.0  # in [0, 0.5): cDPO (sigmoid), robust, simpo
    gamma: float = 0.0  # simpo margin
    reference: str = "precomputed"  # precomputed | frozen_copy | lora_off | none
    batch_size: int = 8  # global batch (pairs per optimizer step)
    grad_accum_steps: int = 1  # micro-batches per step
    num_epochs: int = 1  # passes over the pairs
    max_steps: int = 0  # 0: num_epochs over the data
    vocab_chunk: int = 0  # >0: log-probs over vocabulary chunks of this size (lean memory)
    packing: bool = False  # pack several pairs per row with segment ids: same loss, no compute on padding
    optim: OptimSection = field(default_factory=OptimSection)  # optimizer
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 1  # steps between metric records
    seed: int | None = None  # training seed (data order, LoRA init, BPO warm-up order); null: the top-level seed


@dataclasses.dataclass
class EvalSection:
    num_prompts: int = 0  # held-out prompts evaluated; 0: all
    n: int = 1  # responses per prompt
    temperature: float = 0.0  # 0: greedy
    max_new_tokens: int = 64  # response length limit
    min_new_tokens: int = 1  # EOS is excluded before this many tokens (1: no empty responses)
    batch_size: int = 16  # prompts per batch
    seed: int | None = None  # eval sampling seed (policy and reference alike); null: the top-level seed


@dataclasses.dataclass
class RunConfig:
    run_dir: str = "runs/default"  # every stage writes its outputs here
    seed: int = 0  # the run's seed: SFT data order, random init, and every stage seed left null
    model: ModelSection = field(default_factory=ModelSection)  # policy model
    mesh: MeshSection = field(default_factory=MeshSection)  # device mesh ("data", "fsdp", "tensor")
    distributed: DistributedSection = field(default_factory=DistributedSection)  # multi-host setup
    data: DataSection = field(default_factory=DataSection)  # input files and lengths
    lora: LoraSection = field(default_factory=LoraSection)  # LoRA adapters
    sft: SftSection = field(default_factory=SftSection)  # optional supervised warm-up
    sample: SampleSection = field(default_factory=SampleSection)  # on-policy sampling
    reward: RewardSection = field(default_factory=RewardSection)  # response scoring
    pairs: PairsSection = field(default_factory=PairsSection)  # reward-distribution pair construction
    bpo: BpoSection = field(default_factory=BpoSection)  # breadth compression and depth allocation
    train: TrainSection = field(default_factory=TrainSection)  # DPO training
    eval: EvalSection = field(default_factory=EvalSection)  # held-out evaluation


# ----------------------------------------------------------------------------------------------
# Errors and provenance


class ConfigError(ValueError):
    """A configuration problem: names where it came from (file:line or --set) and the dotted key."""

    def __init__(self, key: str | None, problem: str, where: str | None = None):
        self.key, self.problem, self.where = key, problem, where
        super().__init__(": ".join(part for part in (where, key, problem) if part))

    def located(self, where: str) -> ConfigError:
        return ConfigError(self.key, self.problem, where)


class _Origins(dict):
    """Dotted key -> where it was set (file:line, or the --set override).

    A key that was never set itself is located by its last-set sub-key (for a whole-section error
    such as `mesh`), else by its nearest set ancestor, else by the file alone.
    """

    def __init__(self, default: str):
        super().__init__()
        self.default = default

    def of(self, key: str | None) -> str:
        if key and key not in self:
            inside = [where for k, where in self.items() if k.startswith(key + ".")]
            if inside:
                return inside[-1]
        while key:
            if key in self:
                return self[key]
            key = key.rpartition(".")[0]
        return self.default


# ----------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: exponent floats without a dot (`1e-6`) are floats, and only
    true/false are booleans (YAML 1.1 also reads yes/no/on/off as booleans: `allocator: off`)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path) -> tuple[Any, _Origins]:
    """Parse a YAML file; also record the line of every mapping key as `file:line`.

    Aliases (`*name`) are refused before anything is built: a few lines of nested aliases expand to
    billions of nodes ("billion laughs"), and a config is short enough to write out. Duplicate keys
    are refused too (YAML would silently keep the last).
    """
    origins = _Origins(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(None, f"cannot read config file ({e.strerror})", str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(None, f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})", str(path)) from None
    loader = _Loader(text)
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(None, f"YAML alias *{event.anchor} is not supported: write the value out",
                                  f"{path}:{event.start_mark.line + 1}")
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(None, f"invalid YAML: {getattr(e, 'problem', None) or e}", where) from None
    finally:
        loader.dispose()
    for key, key_node in _key_nodes(node, ""):
        where = f"{path}:{key_node.start_mark.line + 1}"
        if key in origins:
            raise ConfigError(key, f"duplicate key (first at {origins[key]})", where)
        origins[key] = where
    return data, origins


def _key_nodes(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            yield key, key_node
            yield from _key_nodes(value_node, key + ".")


def _apply_override(raw: dict, item: str, origins: _Origins) -> None:
    """Set `a.b.c=value` in the raw mapping, `value` parsed as a YAML scalar/list/mapping."""
    key, eq, text = item.partition("=")
    key = key.strip()
    where = f"{origins.default} (--set {item})"
    if not eq or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(key or None, "an override must look like section.key=value", where)
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(key, f"value {text!r} is not valid YAML ({e})", where) from None
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: i + 1]), "is a value, not a section", where)
    node[leaf] = value
    origins[key] = where


# ----------------------------------------------------------------------------------------------
# Building the dataclasses from a mapping: keys and types


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (ints accepted for floats, lists become tuples) or raise _Mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is not type(None):
                try:
                    return _coerce(value, arm)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_coerce(v, item_type) for v in value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _Mismatch
        return float(value)
    if tp is int and isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, tp):
        return value
    raise _Mismatch


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (sections included)."""
    cls = cls or RunConfig
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(_hints(cls)[f.name]):
            keys.extend(_all_keys(_hints(cls)[f.name], f"{prefix}{f.name}."))
    return keys


def _unknown_key(key: str, siblings: list[str]) -> ConfigError:
    """An unknown-key error with a did-you-mean: a close sibling, else a close key elsewhere."""
    leaf = key.rpartition(".")[2]
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        hint = f"{key.rpartition('.')[0]}.{close[0]}".lstrip(".")
    else:
        keys = _all_keys()
        by_leaf = {k.rpartition(".")[2]: k for k in keys}
        close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        hint = by_leaf[close[0]] if close else None
    suggestion = f"; did you mean {hint}?" if hint else f"; valid keys here: {', '.join(siblings)}"
    return ConfigError(key, f"unknown key{suggestion}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or None, f"must be a mapping of keys, got {_describe(raw)}")
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted, names)
        tp = _hints(cls)[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted + ".")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except _Mismatch:
            declared = next(f.type for f in dataclasses.fields(cls) if f.name == key)
            raise ConfigError(dotted, f"expected {declared}, got {_describe(value)}") from None
    return cls(**kwargs)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def config_from_dict(raw: dict) -> RunConfig:
    """A RunConfig from a nested mapping, checking keys and types (not values: see `validate`)."""
    return _build(RunConfig, raw, "")


# ----------------------------------------------------------------------------------------------
# Validation: choices, ranges, contradictions, mesh, files


def _get(config: RunConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), config)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "reward.kind": REWARD_KINDS,
    "bpo.embedder": EMBEDDERS,
    "bpo.depth_allocator": DEPTH_ALLOCATORS,
    "bpo.base_pair": BASE_PAIRS,
    "bpo.projection": PROJECTIONS,
    "train.loss_type": LOSS_TYPES,
    "train.reference": REFERENCE_MODES,
    "train.optim.schedule": SCHEDULES,
}

_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_UNIT_OPEN = ("in [0, 1)", lambda v: 0 <= v < 1)
_SEED = ("in [0, 2**32) (a uint32 PRNG seed)", lambda v: 0 <= v < 2**32)
_BOUNDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "data.max_length": _POSITIVE,
    "data.max_prompt_length": _POSITIVE,
    "lora.rank": _NON_NEGATIVE,
    "lora.alpha": _POSITIVE,
    "sft.steps": _POSITIVE,
    "sft.batch_size": _POSITIVE,
    "sft.learning_rate": _POSITIVE,
    "sft.warmup_steps": _NON_NEGATIVE,
    "sample.n": (">= 2 (a pair needs two responses)", lambda v: v >= 2),
    "sample.temperature": _NON_NEGATIVE,
    "sample.top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "sample.top_k": _NON_NEGATIVE,
    "sample.max_new_tokens": _POSITIVE,
    "sample.batch_size": _POSITIVE,
    "reward.batch_size": _POSITIVE,
    "pairs.min_margin": _NON_NEGATIVE,
    "pairs.k_rej": _POSITIVE,
    "bpo.num_prompts": _NON_NEGATIVE,
    "bpo.pairs_per_prompt": _NON_NEGATIVE,
    "bpo.budget": _NON_NEGATIVE,
    "bpo.proj_dim": _POSITIVE,
    "bpo.num_clusters": _POSITIVE,
    "bpo.warmup_steps": _NON_NEGATIVE,
    "bpo.feature_batch_size": _POSITIVE,
    "train.beta": _POSITIVE,
    "train.label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),
    "train.gamma": _NON_NEGATIVE,
    "train.batch_size": _POSITIVE,
    "train.grad_accum_steps": _POSITIVE,
    "train.num_epochs": _POSITIVE,
    "train.max_steps": _NON_NEGATIVE,
    "train.vocab_chunk": _NON_NEGATIVE,
    "train.checkpoint_every": _NON_NEGATIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.log_every": _POSITIVE,
    "train.optim.learning_rate": _POSITIVE,
    "train.optim.warmup_steps": _NON_NEGATIVE,
    "train.optim.weight_decay": _NON_NEGATIVE,
    "train.optim.b1": _UNIT_OPEN,
    "train.optim.b2": _UNIT_OPEN,
    "train.optim.eps": _POSITIVE,
    "train.optim.max_grad_norm": _NON_NEGATIVE,
    "eval.num_prompts": _NON_NEGATIVE,
    "eval.n": _POSITIVE,
    "eval.temperature": _NON_NEGATIVE,
    "eval.max_new_tokens": _POSITIVE,
    "eval.batch_size": _POSITIVE,
    "distributed.num_processes": _POSITIVE,
    "distributed.process_id": _NON_NEGATIVE,
    "seed": _SEED,
    "sample.seed": _SEED,
    "pairs.seed": _SEED,
    "bpo.seed": _SEED,
    "train.seed": _SEED,
    "eval.seed": _SEED,
}

_INPUT_FILES = ("data.prompts", "data.scored", "data.pairs", "data.eval_prompts", "data.eval_pairs", "sft.data")
_LOSSES_WITH_LABEL_SMOOTHING = ("sigmoid", "robust", "simpo")


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def _check_values(config: RunConfig) -> None:
    if type(config) is not RunConfig:
        raise TypeError(f"validate expects a RunConfig, got {type(config).__name__}")
    _check(bool(config.run_dir), "run_dir", "must not be empty")
    for key, allowed in _CHOICES.items():
        _check_choice(key, _get(config, key), allowed)
    for key, (text, ok) in _BOUNDS.items():
        value = _get(config, key)
        _check(value is None or ok(value), key, f"must be {text}, got {value!r}")
    _check_strategy("pairs.strategy", config.pairs.strategy)
    _check(len(config.bpo.candidate_strategies) > 0, "bpo.candidate_strategies", "must list at least one strategy")
    for name in config.bpo.candidate_strategies:
        _check_strategy("bpo.candidate_strategies", name)


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(key, f"{value!r} is not one of {', '.join(allowed)}{hint}")


def _check_strategy(key: str, name: str) -> None:
    try:
        parse_strategy(name)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None


def _check_regex(key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(key, f"{pattern!r} is not a valid regular expression ({e})") from None


def _check_contradictions(config: RunConfig) -> None:
    m, t, d = config.model, config.train, config.data
    sources = [k for k in ("path", "gguf", "init") if getattr(m, k) is not None]
    _check(len(sources) == 1, "model", f"set exactly one of model.path, model.gguf, model.init (got {sources or 'none'})")
    _check(d.max_prompt_length < d.max_length, "data.max_prompt_length",
           f"must be below data.max_length ({d.max_length}) to leave room for a response, got {d.max_prompt_length}")
    buckets = d.length_buckets
    if buckets:
        _check(buckets[0] > 0 and all(a < b for a, b in zip(buckets, buckets[1:])), "data.length_buckets",
               f"must be positive and strictly increasing, got {list(buckets)}")
        _check(buckets[-1] >= d.max_length, "data.length_buckets",
               f"the largest bucket ({buckets[-1]}) must hold data.max_length ({d.max_length})")
    if config.lora.rank > 0:
        _check(len(config.lora.targets) > 0, "lora.targets", "must list at least one pattern when lora.rank > 0")
        for pattern in config.lora.targets:
            _check_regex("lora.targets", pattern)
    if config.bpo.trainable != "lora":
        _check_regex("bpo.trainable", config.bpo.trainable)
    _check(config.bpo.pairs_per_prompt == 0 or config.bpo.depth_allocator == "off", "bpo.pairs_per_prompt",
           f"uniform balancing replaces depth allocation: set bpo.depth_allocator to off (it is {config.bpo.depth_allocator!r})")
    _check(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
           f"{t.grad_accum_steps} does not divide train.batch_size {t.batch_size}")
    _check(t.reference != "lora_off" or config.lora.rank > 0, "train.reference",
           "'lora_off' uses the model without its adapters as reference: it needs lora.rank > 0")
    _check(t.reference != "none" or t.loss_type == "simpo", "train.reference",
           f"'none' only suits the reference-free loss simpo, not loss_type {t.loss_type!r}")
    _check(t.label_smoothing == 0 or t.loss_type in _LOSSES_WITH_LABEL_SMOOTHING, "train.label_smoothing",
           f"is used only by {', '.join(_LOSSES_WITH_LABEL_SMOOTHING)}, not loss_type {t.loss_type!r}")
    _check(t.gamma == 0 or t.loss_type == "simpo", "train.gamma", f"is used only by simpo, not loss_type {t.loss_type!r}")
    if _needs_scoring(config):
        _check_reward(config.reward)
    _check(not config.sft.enabled or config.sft.data is not None, "sft.data", "sft.enabled needs a demonstrations file")
    for name in ("sample", "eval"):
        s = getattr(config, name)
        _check(s.min_new_tokens <= s.max_new_tokens, f"{name}.min_new_tokens",
               f"must not exceed {name}.max_new_tokens ({s.max_new_tokens}), got {s.min_new_tokens}")
    dist = config.distributed
    if dist.process_id is not None:
        _check(dist.num_processes is not None, "distributed.process_id", "needs distributed.num_processes too")
        _check(dist.process_id < dist.num_processes, "distributed.process_id",
               f"must be below distributed.num_processes ({dist.num_processes}), got {dist.process_id}")


def _needs_scoring(config: RunConfig) -> bool:
    """Responses get scored when the run starts from prompts, not from scored groups or pairs."""
    d = config.data
    return d.prompts is not None and d.scored is None and d.pairs is None


def _check_reward(r: RewardSection) -> None:
    if r.kind == "rule":
        _check(r.function is not None and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", r.function) is not None,
               "reward.function", f"kind 'rule' needs a 'module:function' name, got {r.function!r}")
    _check(r.kind != "model" or r.model_path is not None, "reward.model_path", "kind 'model' needs a reward model directory")
    _check(r.kind != "gym" or r.gym_task is not None, "reward.gym_task", "kind 'gym' needs a reasoning-gym task name")
    _check(r.kind != "precomputed", "reward.kind",
           "'precomputed' reads rewards from data.scored (or pairs from data.pairs), but the run starts from data.prompts")


def _check_mesh(config: RunConfig, num_devices: int | None) -> None:
    """The mesh fits the devices, and a training micro-batch splits over its batch shards."""
    shape = dataclasses.asdict(config.mesh)
    # Without a device count, still catch zero/negative sizes and several -1 axes.
    devices = num_devices if num_devices is not None else math.prod(v for v in shape.values() if v != -1)
    try:
        dims = dict(zip(MESH_AXES, resolve_mesh_shape(shape, devices)))
    except MeshError as e:
        raise ConfigError("mesh", str(e)) from None
    if num_devices is None:
        return
    shards = dims["data"] * dims["fsdp"]
    micro = config.train.batch_size // config.train.grad_accum_steps
    _check(micro % shards == 0, "train.batch_size",
           f"a micro-batch of {micro} pairs (batch_size / grad_accum_steps) does not split over "
           f"{shards} batch shards (mesh data x fsdp = {dims['data']} x {dims['fsdp']})")


def _check_files(config: RunConfig) -> None:
    m = config.model
    if m.path is not None:
        _check_model_dir("model.path", m.path)
    if m.gguf is not None:
        try:
            gguf = resolve_path(m.gguf)  # a path, or "asset:NAME" from an installed asset package
        except AssetNotInstalled as e:
            raise ConfigError("model.gguf", str(e)) from None
        _check(gguf.is_file(), "model.gguf", f"file not found: {m.gguf}")
    if m.tokenizer is not None:
        _check((Path(m.tokenizer) / "tokenizer.json").is_file(), "model.tokenizer",
               f"{m.tokenizer}: not a tokenizer directory (no tokenizer.json)")
    if config.reward.kind == "model" and _needs_scoring(config):
        _check_model_dir("reward.model_path", config.reward.model_path)
    for key in _INPUT_FILES:
        path = _get(config, key)
        if path is not None and is_tfds_reference(path):
            _check_tfds(key, path)
        else:
            _check(path is None or Path(path).exists(), key, f"file not found: {path}")


def _check_tfds(key: str, reference: str) -> None:
    """A TFDS input opens: the dataset is prepared (array_record) and has the split (imports tfds)."""
    from bpo_jax.data.tfds_builder import open_builder

    try:
        open_builder(reference)
    except DataError as e:
        raise ConfigError(key, str(e)) from None


def _check_model_dir(key: str, path: str) -> None:
    _check(Path(path).is_dir(), key, f"directory not found: {path}")
    _check((Path(path) / "config.json").is_file(), key, f"{path}: no config.json (expected a Hugging Face model directory)")


def _check_model_config(config: RunConfig, check_files: bool) -> None:
    """The model's own config (model.init, or model.path's config.json). The only check that imports
    JAX (through bpo_jax.models), so it runs last: every other config error is reported without it."""
    from bpo_jax.models.config import ModelConfig, ModelConfigError

    m = config.model
    try:
        if m.init is not None:
            ModelConfig.from_hf_dict(m.init, source="model.init")
        elif m.path is not None and check_files:
            ModelConfig.from_file(m.path)
    except ModelConfigError as e:
        key = "model.init" if m.init is not None else "model.path"
        raise ConfigError(key, str(e).removeprefix(f"{key}: ")) from None


def validate(config: RunConfig, num_devices: int | None = None, check_files: bool = True) -> None:
    """Raise ConfigError for the first problem: bad choice or range, contradiction, mesh, files, then
    the model's config (the only check that loads JAX).

    num_devices: check the mesh against this many devices (None: only its static shape).
    check_files: require the model directory and input files to exist (relative to the cwd).
    """
    _check_values(config)
    _check_contradictions(config)
    _check_mesh(config, num_devices)
    if check_files:
        _check_files(config)
    _check_model_config(config, check_files)


def validate_devices(config: RunConfig, num_devices: int) -> None:
    """Raise ConfigError when the mesh does not fit `num_devices` (after `validate` without them)."""
    _check_mesh(config, num_devices)


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    num_devices: int | None = None,
    check_files: bool = True,
) -> RunConfig:
    """Load a YAML config, apply `section.key=value` overrides, and validate it (see `validate`)."""
    path = Path(path)
    raw, origins = _read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(None, f"must be a mapping of sections, got {_describe(raw)}", str(path))
    for item in overrides:
        _apply_override(raw, item, origins)
    try:
        config = config_from_dict(raw)
        validate(config, num_devices=num_devices, check_files=check_files)
    except ConfigError as e:
        raise e.located(origins.of(e.key)) from None
    return config


SEEDED_SECTIONS = ("sample", "pairs", "bpo", "train", "eval")


def resolve_seeds(config: RunConfig) -> RunConfig:
    """A copy in which every stage seed left null is the top-level `seed`; explicit ones are kept.

    The one place stage seeds are resolved (`pipeline.Run` calls it), so changing `seed` alone
    reseeds every stage. Configs keep null until a run starts: a copy with another top-level seed
    still inherits it.
    """
    sections = {
        name: dataclasses.replace(getattr(config, name), seed=config.seed)
        for name in SEEDED_SECTIONS
        if getattr(config, name).seed is None
    }
    return dataclasses.replace(config, **sections)


# ----------------------------------------------------------------------------------------------
# Output: resolved config, reference table


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists): what `save_config` writes and `config_from_dict` reads."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config` reads it back unchanged."""
    with atomic_open(path) as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False, default_flow_style=False)


@functools.cache
def field_help() -> dict[str, str]:
    """Dotted key -> the trailing `# comment` of its field declaration in this module."""
    source = inspect.getsource(sys.modules[__name__])
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    by_class: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            by_class[node.name] = {
                stmt.target.id: next((comments[i] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in comments), "")
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            out[prefix + f.name] = by_class[cls.__name__].get(f.name, "")
            if dataclasses.is_dataclass(_hints(cls)[f.name]):
                walk(_hints(cls)[f.name], f"{prefix}{f.name}.")

    walk(RunConfig, "")
    return out


def config_reference_markdown() -> str:
    """The configuration reference as a Markdown table: section, key, type, default, description."""
    helps = field_help()
    rows = ["| section | key | type | default | description |", "|---|---|---|---|---|"]

    def walk(cls: type, section: str) -> None:
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}" if section else f.name
            tp = _hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, dotted)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = default if isinstance(default, str) else json.dumps(_plain(default))
            cells = [section or "(top level)", f"`{f.name}`", f"`{f.type}`", f"`{shown}`", helps[dotted]]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")

    walk(RunConfig, "")
    return "\n".join(rows) + "\n"
