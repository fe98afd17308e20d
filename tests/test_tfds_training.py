"""End to end from TFDS inputs: SFT demonstrations and scored groups as TFDS datasets go through
sft -> pairs -> train exactly as the same rows from JSONL files do (same pairs, same weights)."""

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
    "data.prompts=null", "data.eval_prompts=null", "data.eval_pairs=null",
    "sft.steps=2", "sft.batch_size=8", "bpo.breadth_enabled=false", "bpo.depth_allocator=off",
    "train.batch_size=8", "train.max_steps=2", "mesh.data=-1",
    "model.init.hidden_size=16", "model.init.intermediate_size=32", "model.init.num_hidden_layers=1",
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(run_dir: Path, scored: str, demos: str) -> Path:
    overrides = [*SHORT, f"run_dir={run_dir}", f"data.scored={scored}", f"sft.data={demos}"]
    config = load_config(DEMO, overrides, num_devices=jax.device_count())
    for stage in ("sft", "pairs", "train"):
        run_pipeline(config, stage)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("tfds_training")
    pairs = [json.loads(line) for line in (ASSETS / "eval_pairs.jsonl").read_text().splitlines()[:24]]
    # Groups of two scored responses (correct sort: 1, a shuffled one: 0), and 16 demonstrations.
    scored = _jsonl(tmp / "scored.jsonl", [
        {"id": p["id"], "prompt": p["prompt"], "responses": [p["rejected"], p["chosen"]], "rewards": [0.0, 1.0]} for p in pairs
    ])
    demos = _jsonl(tmp / "sft.jsonl", [json.loads(line) for line in (ASSETS / "sft.jsonl").read_text().splitlines()[:16]])
    scored_ds = build_tfds_dataset(scored, tmp / "tfds", name="scored")
    demos_ds = build_tfds_dataset(demos, tmp / "tfds", name="demos")
    assert (scored_ds.builder_config.kind, demos_ds.builder_config.kind) == ("scored", "demonstrations")
    from_files = _run(tmp / "jsonl_run", str(scored), str(demos))
    from_tfds = _run(tmp / "tfds_run", f"tfds:{scored_ds.data_dir}[train]", demos_ds.data_dir)
    return from_files, from_tfds


def test_training_from_tfds_matches_training_from_jsonl(runs):
    from_files, from_tfds = runs
    pairs = (from_tfds / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 24 and pairs == (from_files / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert all(json.loads(p)["meta"]["margin"] == 1.0 for p in pairs)  # chosen = the correct sort
    for model in ("sft_model", "policy"):
        weights = (from_tfds / model / "model.safetensors").read_bytes()
        assert weights == (from_files / model / "model.safetensors").read_bytes(), model
    metrics = [json.loads(line) for line in (from_tfds / "train" / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # Training moved the policy away from the SFT model it started from.
    assert (from_tfds / "policy" / "model.safetensors").read_bytes() != (from_tfds / "sft_model" / "model.safetensors").read_bytes()
