"""The top-level `seed` reaches every stage unless the stage sets its own (config.resolve_seeds).

The wiring test runs each pipeline stage until the call that consumes its seed, with that call
replaced by a recorder, so it checks what the stages pass on, not just what the config holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bpo_jax import balance, depth, pipeline
from bpo_jax.config import (
    SEEDED_SECTIONS,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve_seeds,
    save_config,
)
from bpo_jax.pipeline import Run

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "data" / "tiny_tokenizer"
EXPLICIT = {"sample": 11, "pairs": 12, "bpo": 13, "train": 14, "eval": 15}


def stage_seeds(config: RunConfig) -> dict[str, int | None]:
    return {name: getattr(config, name).seed for name in SEEDED_SECTIONS}


def test_stage_seeds_default_to_null_and_inherit_the_run_seed():
    config = config_from_dict({"seed": 7})
    assert set(SEEDED_SECTIONS) == set(EXPLICIT)
    assert stage_seeds(config) == dict.fromkeys(SEEDED_SECTIONS)  # null until a run resolves them
    resolved = resolve_seeds(config)
    assert stage_seeds(resolved) == dict.fromkeys(SEEDED_SECTIONS, 7)
    assert stage_seeds(config) == dict.fromkeys(SEEDED_SECTIONS)  # the input is not modified
    assert resolve_seeds(resolved) == resolved
    # Changing only `seed` changes every stage's seed.
    assert stage_seeds(resolve_seeds(config_from_dict({"seed": 8}))) == dict.fromkeys(SEEDED_SECTIONS, 8)
    assert {k: v for k, v in vars(resolved).items() if k not in SEEDED_SECTIONS} == {
        k: v for k, v in vars(config).items() if k not in SEEDED_SECTIONS}  # nothing else changes


def test_explicit_stage_seeds_win():
    config = config_from_dict({"seed": 7, "pairs": {"seed": 12}, "train": {"seed": 0}})
    assert stage_seeds(resolve_seeds(config)) == {"sample": 7, "pairs": 12, "bpo": 7, "train": 0, "eval": 7}


def test_saved_config_keeps_null_seeds_and_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\nmodel:\n  path: unused\nbpo:\n  seed: 13\n")
    config = load_config(path, ["train.seed=null"], check_files=False)
    assert stage_seeds(config) == {"sample": None, "pairs": None, "bpo": 13, "train": None, "eval": None}
    for which in (config, resolve_seeds(config)):  # as loaded, and as a run saves it
        out = tmp_path / "saved.yaml"
        save_config(which, out)
        assert load_config(out, check_files=False) == which
        assert config_from_dict(config_to_dict(which)) == which
    assert yaml.safe_load(out.read_text())["sample"]["seed"] == 3


@pytest.mark.parametrize("key, value", [("seed", -1), ("train.seed", 2**32), ("eval.seed", -5)])
def test_out_of_range_seed_is_an_error_naming_the_key(tmp_path, key, value):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: unused\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, [f"{key}={value}"], check_files=False)
    assert str(info.value) == f"{path} (--set {key}={value}): {key}: must be in [0, 2**32) (a uint32 PRNG seed), got {value}"


class _Reached(Exception):
    """Raised by a recorder: the stage got as far as the seeded call."""


def consumed_seeds(tmp_path: Path, monkeypatch, raw: dict) -> dict[str, dict[str, int]]:
    """Run each stage of a run built from `raw` up to its last seeded call: stage -> call -> seed."""
    calls: dict[str, int] = {}

    def recorder(name: str, seed_of, then=None):
        def record(*args, **kwargs):
            calls[name] = seed_of(*args, **kwargs)
            if then is None:
                raise _Reached
            return then(*args, **kwargs)
        return record

    def rows(path: Path, items: list[dict]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        return path

    root = tmp_path / "run"
    prompts = rows(tmp_path / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"w{i} w{i + 1}"} for i in range(4)])
    demos = rows(tmp_path / "demos.jsonl", [{"prompt": "w1", "response": "w2"}] * 4)
    # Upstream outputs in place, so pairs, bpo and train find their inputs.
    rows(root / "scored.jsonl", [{"id": f"q{i}", "prompt": f"w{i}", "responses": ["w1", "w2 w3", "w4", "w5 w6"],
                                  "rewards": [0.0, 1.0, 3.0, 2.0]} for i in range(4)])
    rows(root / "pairs" / "pairs.jsonl", [{"prompt": "w1", "chosen": "w2", "rejected": "w3"}] * 4)
    run = Run(config_from_dict({
        **raw, "run_dir": str(root), "model": {"path": "unused", "tokenizer": str(TOKENIZER)},
        "data": {"prompts": str(prompts), "max_length": 32, "max_prompt_length": 16},
        "sft": {"enabled": True, "data": str(demos)},
        "bpo": {**raw.get("bpo", {}), "breadth_enabled": True, "num_prompts": 2, "embedder": "tfidf",
                "depth_allocator": "margin"},
        "train": {**raw.get("train", {}), "reference": "frozen_copy"},
    }))
    monkeypatch.setattr(Run, "load_model", lambda self, directory=None: None)
    monkeypatch.setattr(pipeline, "sample_stage", recorder("sample", lambda *a: a[4].seed))
    monkeypatch.setattr(balance, "breadth_compress", recorder("breadth", lambda *a, seed: seed, balance.breadth_compress))
    monkeypatch.setattr(pipeline, "run_pairs_stage", recorder("pairs", lambda *a, seed, **k: seed))
    monkeypatch.setattr(depth, "candidate_pairs", recorder("candidates", lambda *a, seed, **k: seed, depth.candidate_pairs))
    monkeypatch.setattr(depth, "allocate", recorder("depth", lambda *a, seed, **k: seed))
    monkeypatch.setattr(pipeline, "add_lora", recorder("lora", lambda *a, seed: seed, lambda *a, **k: None))
    monkeypatch.setattr(pipeline, "PreferenceBatcher", recorder("batches", lambda *a, seed, **k: seed))
    stages = {
        "sft": pipeline.stage_sft, "sample": pipeline.stage_sample, "pairs": pipeline.stage_pairs,
        "bpo": pipeline.stage_bpo, "train": pipeline.stage_train,
        "eval": lambda run: pipeline.eval_responses(run, None, prompts, "policy"),
    }
    seen = {}
    for name, stage in stages.items():
        calls.clear()
        with pytest.raises(_Reached):
            stage(run)
        seen[name] = dict(calls)
    return seen


def test_every_stage_is_seeded_by_the_run_seed(tmp_path, monkeypatch):
    assert consumed_seeds(tmp_path, monkeypatch, {"seed": 7}) == {
        "sft": {"batches": 7},
        "sample": {"breadth": 7, "sample": 7},
        "pairs": {"pairs": 7},
        "bpo": {"candidates": 7, "depth": 7},
        "train": {"lora": 7, "batches": 7},
        "eval": {"sample": 7},
    }


def test_every_stage_keeps_its_explicit_seed(tmp_path, monkeypatch):
    raw = {"seed": 7, **{name: {"seed": seed} for name, seed in EXPLICIT.items()}}
    assert consumed_seeds(tmp_path, monkeypatch, raw) == {
        "sft": {"batches": 7},  # SFT has no section seed: the run's
        "sample": {"breadth": 13, "sample": 11},  # breadth clustering is BPO's
        "pairs": {"pairs": 12},
        "bpo": {"candidates": 12, "depth": 13},  # candidate pairs are built like the pairs stage's
        "train": {"lora": 14, "batches": 14},
        "eval": {"sample": 15},
    }
