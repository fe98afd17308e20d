"""The whole job through its command line: a shortened demo run killed mid-training and resumed,
and bad inputs stopped before any work starts.

These run `python -m bpo_jax.main` in subprocesses on one CPU device, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
# The demo, shortened: fewer SFT steps and samples, one epoch, a checkpoint every 2 train steps.
SHORT = [
    "sft.steps=40",
    "sample.n=4",
    "train.num_epochs=1",
    "train.checkpoint_every=2",
    "eval.num_prompts=16",
    "eval.n=2",
]


def cli(run_dir: Path, *overrides: str, config: Path = DEMO) -> list[str]:
    args = [sys.executable, "-m", "bpo_jax.main", "--config", str(config), "--set", f"run_dir={run_dir}"]
    for o in overrides:
        args += ["--set", o]
    return args


def env() -> dict[str, str]:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    e.pop("XLA_FLAGS", None)  # one device, as `make demo` runs
    return e


def train_checkpoints(run_dir: Path) -> list[int]:
    ckpt = run_dir / "train" / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_stages(tmp_path):
    run_dir = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cli(run_dir, *SHORT), cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not [s for s in train_checkpoints(run_dir) if s >= 2]:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no train checkpoint within 10 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (run_dir / "policy").exists(), "the run finished before it could be killed"

    finished = {
        name: (run_dir / name).stat().st_mtime_ns
        for name in ("sft_model/model.safetensors", "responses.jsonl", "scored.jsonl", "pairs/pairs.jsonl")
    }
    killed_at = train_checkpoints(run_dir)[-1]
    second = subprocess.run(cli(run_dir, *SHORT), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]

    # Nothing finished was redone; training continued from its last checkpoint.
    for name, mtime in finished.items():
        assert (run_dir / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    for stage in ("sft", "sample", "score", "pairs"):
        assert f"[{stage}] done already" in out
    assert f"[train] resumed from the checkpoint at step {killed_at} of" in out
    # One metrics record per step, each step once, ending at the last step.
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= killed_at + 1

    results = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert results["n_prompts"] == 16 and results["n_responses"] == 32 and results["n_pairs"] > 0
    assert "mean reward" in out and "win rate vs reference" in out
    assert (run_dir / "eval" / "rewards.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_data_row_stops_before_any_work(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "sort 1 2 ="}\n{"id": "b", "prompt": 7}\n')
    run_dir = tmp_path / "run"
    result = subprocess.run(
        cli(run_dir, f"data.prompts={prompts}"), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert f"{prompts}:2: field 'prompt':" in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "sft").exists() and not (run_dir / "sft_model").exists()


def test_missing_model_directory_stops_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no_such_model"
    result = subprocess.run(
        cli(run_dir, f"model.path={missing}", "model.init=null", "model.tokenizer=null"),
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.path" in result.stderr and str(missing) in result.stderr
    assert not run_dir.exists()


def test_unknown_config_key_suggests_the_right_one(tmp_path):
    result = subprocess.run(
        cli(tmp_path / "run", "train.learning_rate=1e-5"), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "train.learning_rate" in result.stderr and "train.optim.learning_rate" in result.stderr
