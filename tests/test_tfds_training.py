"""End to end from a TFDS input: scored groups as a TFDS dataset go through pairs -> train exactly as
the same rows from a JSONL file do (same pairs, same weights). SFT demonstrations read from TFDS
equal their JSONL file's (test_data_tfds), which is all the sft stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from bpo_jax.config import load_config
from bpo_jax.data.tfds_builder import build_tfds_dataset
from bpo_jax.demo_task import ASSETS
from bpo_jax.pipeline import run_pipeline

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SHORT = [
    "data.prompts=null", "data.eval_prompts=null", "data.eval_pairs=null", "sft.enabled=false",
    "bpo.breadth_enabled=false", "bpo.depth_allocator=off", "train.loss_type=simpo", "train.reference=none",
    "train.batch_size=8", "train.max_steps=2", "mesh.data=-1",
    "model.init.hidden_size=16", "model.init.intermediate_size=32", "model.init.num_hidden_layers=1",
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(run_dir: Path, scored: str) -> Path:
    config = load_config(DEMO, [*SHORT, f"run_dir={run_dir}", f"data.scored={scored}"], num_devices=jax.device_count())
    for stage in ("pairs", "train"):
        run_pipeline(config, stage)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tfds_training")
    pairs = [json.loads(line) for line in (ASSETS / "eval_pairs.jsonl").read_text().splitlines()[:24]]
    # Groups of two scored responses: the correct sort (reward 1) and a shuffled one (reward 0).
    scored = _jsonl(tmp / "scored.jsonl", [
        {"id": p["id"], "prompt": p["prompt"], "responses": [p["rejected"], p["chosen"]], "rewards": [0.0, 1.0]} for p in pairs
    ])
    scored_ds = build_tfds_dataset(scored, tmp / "tfds", name="scored")
    assert scored_ds.builder_config.kind == "scored"
    return _run(tmp / "jsonl_run", str(scored)), _run(tmp / "tfds_run", f"tfds:{scored_ds.data_dir}[train]")


def test_training_from_tfds_matches_training_from_jsonl(runs):
    from_files, from_tfds = runs
    pairs = (from_tfds / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 24 and pairs == (from_files / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert all(json.loads(p)["meta"]["margin"] == 1.0 for p in pairs)  # chosen = the correct sort
    weights = (from_tfds / "policy" / "model.safetensors").read_bytes()
    assert weights == (from_files / "policy" / "model.safetensors").read_bytes()
    metrics = [json.loads(line) for line in (from_tfds / "train" / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["loss"] != metrics[1]["loss"]  # it trained
