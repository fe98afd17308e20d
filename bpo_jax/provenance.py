"""Provenance: what produced each stage's output, so a rerun with other settings never reports old results.

A stage's record (`run_dir/provenance/STAGE.json`) holds the config values the stage depends on,
fingerprints of the input files it reads, and the machine and package versions it ran on. Records
are written when a stage starts, so partial outputs (sampling chunks, training checkpoints) are
covered too. A stage depends on its own keys and on everything its upstream stages depend on, so
a change makes exactly that stage and everything downstream stale. Keys that cannot change a result
(run_dir, mesh, checkpoint cadence) are not recorded: a run may resume on another mesh.

Runs written before records existed are compared against their `config.yaml`.
Light on purpose (no JAX import): the CLI and the study runner use it before any heavy work.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

# The stages in pipeline order, and the config keys (dotted prefixes) each reads itself;
# UPSTREAM makes them transitive.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "stats": ("data.prompts", "data.scored", "data.pairs"),
    "sft": ("seed", "model", "data.max_length", "data.max_prompt_length", "data.length_buckets",
            "data.skip_bad_rows", "sft"),
    "sample": ("data.prompts", "bpo.breadth_enabled", "bpo.num_prompts", "bpo.embedder", "bpo.seed", "sample"),
    "score": ("reward",),
    "pairs": ("data.scored", "pairs"),
    "bpo": ("bpo", "lora", "train.loss_type", "train.beta", "train.label_smoothing", "train.gamma", "train.reference",
            "train.vocab_chunk", "train.batch_size", "train.optim", "train.seed"),
    "train": ("data.pairs", "lora", "train"),
    "eval": ("data.eval_prompts", "data.eval_pairs", "eval"),
}
STAGES = tuple(STAGE_KEYS)
UPSTREAM: dict[str, tuple[str, ...]] = {
    "stats": (), "sft": (), "sample": ("sft",), "score": ("sample",), "pairs": ("score",),
    "bpo": ("pairs",), "train": ("bpo",), "eval": ("train",),
}
# Keys that never change a result.
NOT_RECORDED = ("run_dir", "mesh", "distributed", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every")
# Keys naming files or directories: their contents are fingerprinted as well.
FILE_KEYS = ("data.prompts", "data.scored", "data.pairs", "data.eval_prompts", "data.eval_pairs", "sft.data",
             "model.path", "model.gguf", "model.tokenizer", "reward.model_path", "reward.function")
PACKAGES = ("bpo_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_dtypes", "scikit-learn",
            "tokenizers", "safetensors")
HASH_LIMIT = 64 << 20  # larger files are fingerprinted by size and modification time


class StaleUpstream(ValueError):
    """A single stage was asked for while a stage it reads from was made with other settings."""


def stage_keys(stage: str) -> tuple[str, ...]:
    """Every key prefix `stage` depends on: its own and its upstream stages', in pipeline order."""
    keys: list[str] = []
    for up in UPSTREAM[stage]:
        keys += [k for k in stage_keys(up) if k not in keys]
    return tuple(keys + [k for k in STAGE_KEYS[stage] if k not in keys])


def upstream(stage: str) -> list[str]:
    """Every stage `stage` reads from, directly or not."""
    out: list[str] = []
    for up in UPSTREAM[stage]:
        out += [s for s in upstream(up) + [up] if s not in out]
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config mapping -> {dotted key: JSON-plain value} (tuples as lists)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v and (prefix + k) not in ("model.init", "reward.gym_config"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.loads(json.dumps(v, default=str))
    return out


def _selected(flat: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    prefixes = tuple(prefixes)
    return {
        k: v for k, v in flat.items()
        if any(k == p or k.startswith(p + ".") for p in prefixes)
        and not any(k == n or k.startswith(n + ".") for n in NOT_RECORDED)
    }


def fingerprint(target: str | None) -> str | None:
    """sha256 of a file's bytes (size and mtime above HASH_LIMIT), of a directory's files, or of a
    `module:function`'s module source; None when there is nothing on disk to fingerprint."""
    if not target:
        return None
    path = _locate(target)
    if path is None:
        return None
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        stat = f.stat()
        if stat.st_size > HASH_LIMIT:
            h.update(f"{stat.st_size}/{stat.st_mtime_ns}".encode())
            continue
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _locate(target: str) -> Path | None:
    if target.startswith("asset:"):
        from bpo_jax.packaged_assets import resolve_path

        try:
            return resolve_path(target)
        except FileNotFoundError:  # a missing asset package (reported by config validation)
            return None
    path = Path(target)
    if path.exists():
        return path
    module, colon, _ = target.partition(":")
    if colon:  # reward.function "module:function": the module's source, found without importing it
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            return Path(spec.origin)
    return None


def signature(stage: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What `stage`'s output depends on: {"settings": {key: value}, "inputs": {file key: fingerprint}}."""
    settings = _selected(flatten(config), stage_keys(stage))
    inputs = {k: fingerprint(settings[k]) for k in FILE_KEYS if settings.get(k)}
    return {"settings": settings, "inputs": inputs}


def differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Human-readable changes between two signatures: 'train.beta: 1.0 -> 0.5', 'data.prompts (contents)'."""
    out = []
    old, new = before.get("settings", {}), after["settings"]
    for k in sorted(old.keys() | new.keys()):
        if old.get(k) != new.get(k):
            out.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    old_inputs = before.get("inputs")
    if old_inputs is not None:  # records from config.yaml alone carry no fingerprints
        for k, fp in sorted(after["inputs"].items()):
            if k in old_inputs and old.get(k) == new.get(k) and old_inputs[k] != fp:
                out.append(f"{k} ({new[k]}: contents changed)")
    return out


def environment() -> dict[str, Any]:
    """The machine and package versions a run ran on (CPU model and vector ISA matter for XLA CPU numerics)."""
    env = {**_machine(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "")}
    jax = sys.modules.get("jax")
    if jax is not None:
        devices = jax.devices()
        env["devices"] = f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"
    return env


@functools.cache
def _machine() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cpu, isa = platform.processor() or None, []
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in (None, "", platform.machine()):
                cpu = value.strip()
            elif key.strip() == "flags":
                isa = sorted({f for f in value.split() if f.startswith(("avx", "amx", "fma", "sse4"))})
                break
    return {
        "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
        "cpu": cpu, "cpu_isa": isa, "cpu_count": os.cpu_count(), "packages": versions,
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Ledger:
    """The provenance records of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "provenance"
        self.superseded = self.root / "superseded" / _now().replace(":", "")  # this invocation's

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def recorded(self, stage: str) -> dict | None:
        """The stage's record; for runs from before records, the settings of the run's config.yaml."""
        if self.path(stage).is_file():
            return json.loads(self.path(stage).read_text(encoding="utf-8"))
        legacy = self.root / "config.yaml"
        if legacy.is_file() and not self.dir.exists():
            raw = yaml.safe_load(legacy.read_text(encoding="utf-8")) or {}
            return {"settings": _selected(flatten(raw), stage_keys(stage)), "inputs": None}
        return None

    def changes(self, stage: str, config: Mapping[str, Any]) -> list[str]:
        """What differs between the stage's record and `config` (empty: up to date, or never ran)."""
        before = self.recorded(stage)
        return [] if before is None else differences(before, signature(stage, config))

    def start(self, stage: str, config: Mapping[str, Any]) -> None:
        """Record the settings the stage's outputs are about to be made with (kept if already done)."""
        before = self.recorded(stage) if self.path(stage).is_file() else None
        sig = signature(stage, config)
        if before and before.get("status") == "done" and not differences(before, sig):
            return
        self._write(stage, {"stage": stage, "status": "running", "started": _now(), **sig, "environment": environment()})

    def finish(self, stage: str) -> None:
        record = json.loads(self.path(stage).read_text(encoding="utf-8"))
        if record.get("status") != "done":
            self._write(stage, {**record, "status": "done", "finished": _now(), "environment": environment()})

    def supersede(self, stage: str, outputs: Iterable[Path]) -> Path | None:
        """Move the stage's existing outputs (and its record) to run_dir/superseded/TIME/; returns that folder."""
        existing = [p for p in outputs if p.exists() or p.is_symlink()]
        for p in existing:
            target = self.superseded / p.relative_to(self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(target))
        self.path(stage).unlink(missing_ok=True)
        return self.superseded if existing else None

    def _write(self, stage: str, record: dict) -> None:
        from bpo_jax.io_utils import write_json

        write_json(self.path(stage), record)


def archive_config(root: str | Path, config: Mapping[str, Any]) -> Path | None:
    """Keep an earlier config.yaml that differs from `config` as configs/config-TIME.yaml; returns its path."""
    current = Path(root) / "config.yaml"
    if not current.is_file() or flatten(yaml.safe_load(current.read_text(encoding="utf-8")) or {}) == flatten(config):
        return None
    kept = Path(root) / "configs" / f"config-{_now().replace(':', '')}.yaml"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(current, kept)
    return kept
