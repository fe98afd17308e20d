"""The study runner end to end through its command line, at a size CI affords, and its refusals.

A tiny study (2 strategies x n in {4, 8} x 2 seeds, 24 prompts, 3 DPO steps) runs as a user runs
it; the assertions are about what a study promises: nested samples, equal budgets, per-arm counts,
intervals, claims, plots, resumption that keeps finished arms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bpo_jax.config import ConfigError
from bpo_jax.studies.runner import arm_runs
from bpo_jax.studies.spec import load_study, run_stem

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "studies" / "sort_base.yaml"


def write_study(directory: Path, **changes) -> Path:
    prompts = directory / "prompts.jsonl"
    lines = (REPO / "bpo_jax" / "assets" / "study_sort" / "prompts.jsonl").read_text().splitlines()[:24]
    prompts.write_text("\n".join(lines) + "\n")
    study = {
        "name": "tiny", "base": str(BASE), "run_dir": str(directory / "run"),
        "set": {"sft.steps": 20, "data.prompts": str(prompts), "train.max_steps": 3, "train.batch_size": 8,
                "eval.num_prompts": 12, "eval.n": 2, "sample.batch_size": 8},
        "grid": {"pairs.strategy": ["max/min", "max/mu-2s"], "sample.n": [4, 8]},
        "seeds": [0, 1],
        "baseline": {"pairs.strategy": "max/min"},
        "claims": [
            {"claim": "mu-2s beats min at n = 8", "better": {"pairs.strategy": "max/mu-2s", "sample.n": 8},
             "worse": {"pairs.strategy": "max/min", "sample.n": 8}},
            {"claim": "n = 8 gains more", "contrast": [[1, {"sample.n": 8}], [-1, {"sample.n": 4}]]},
        ],
        "bootstrap": 500,
        **changes,
    }
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def run_cli(path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    return subprocess.run([sys.executable, "-m", "bpo_jax.main", "study", "--config", str(path), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    path = write_study(tmp_path_factory.mktemp("study"))
    out = run_cli(path)
    assert out.returncode == 0, out.stderr[-3000:]
    return path, Path(yaml.safe_load(path.read_text())["run_dir"]), out.stdout


def results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_every_arm_and_seed_has_a_result_with_an_equal_budget(finished_study):
    _, run_dir, _ = finished_study
    rows = results(run_dir)
    assert sorted((r["arm"], r["seed"]) for r in rows) == sorted(
        (f"strategy={s} n={n}", seed) for s in ("max/min", "max/mu-2s") for n in (4, 8) for seed in (0, 1))
    for r in rows:
        assert (r["steps"], r["batch_size"]) == (3, 8)
        assert r["epochs"] == pytest.approx(3 * 8 / r["tokenized_pairs"], abs=1e-3)
        assert r["data"]["scored_prompts"] == 24
        assert r["data"]["prompts"] + sum(r["data"]["pairs_stage_skipped"].values()) == 24  # kept or said why not
        rewards = np.load((run_dir / "runs" / run_stem(r["arm"], r["seed"])).with_suffix(".npz"))["rewards"]
        assert rewards.shape == (12, 2) and r["mean_reward"] == pytest.approx(rewards.mean())


def test_smaller_n_takes_each_prompts_first_responses(finished_study):
    _, run_dir, _ = finished_study
    shared = run_dir / "shared"
    full = [json.loads(line) for line in (shared / "scored.jsonl").read_text().splitlines()]
    for n in (4, 8):
        nested = [json.loads(line) for line in (shared / f"scored_n{n}.jsonl").read_text().splitlines()]
        assert [g["id"] for g in nested] == [g["id"] for g in full]
        for small, big in zip(nested, full):
            assert small["responses"] == big["responses"][:n] and small["rewards"] == big["rewards"][:n]


def test_max_mu2s_equals_max_min_below_six_samples(finished_study):
    # Samuelson: at n = 4 no reward lies more than sqrt(3) sigma below the mean, so the response
    # nearest mu - 2 sigma is the minimum: identical pairs, identical training, a zero difference.
    _, run_dir, _ = finished_study
    summary = json.loads((run_dir / "summary.json").read_text())
    arm = next(a for a in summary["arms"] if a["arm"] == "strategy=max/mu-2s n=4")
    assert arm["baseline"] == "strategy=max/min n=4"
    assert arm["vs_baseline"] == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_summary_report_and_plots(finished_study):
    _, run_dir, stdout = finished_study
    summary = json.loads((run_dir / "summary.json").read_text())
    for a in summary["arms"]:
        for key in ("mean_reward", "win_rate"):
            assert a[key]["low"] <= a[key]["mean"] <= a[key]["high"]
        assert a["seeds"] == 2
    assert [c["verdict"] in ("reproduced", "not reproduced", "inconclusive") for c in summary["claims"]] == [True, True]
    cells = {r["arm"]: r["mean_reward"] for r in results(run_dir)}
    n8 = np.mean([v for k, v in cells.items() if k.endswith("n=8")])
    n4 = np.mean([v for k, v in cells.items() if k.endswith("n=4")])
    assert summary["claims"][1]["estimate"]["mean"] == pytest.approx(n8 - n4)
    # No 7x7 heatmap: its two pairings repeat over n, and a cell would mix settings.
    assert set(summary["plots"]) == {"tiny_arms.png", "tiny_scaling.png"}
    assert all((run_dir / p).stat().st_size > 1000 for p in summary["plots"])
    assert "| strategy=max/mu-2s n=8 |" in (run_dir / "report.md").read_text() and "## tiny" in stdout
    assert summary["timing"]["wall_seconds"] > 0 and summary["timing"]["environment"]["packages"]["jax"]


def test_rerun_keeps_finished_arms_and_redoes_a_missing_one(finished_study):
    path, run_dir, _ = finished_study
    before = {r["arm"] + str(r["seed"]): r for r in results(run_dir)}
    lost = run_dir / "runs" / f"{run_stem('strategy=max/mu-2s n=8', 1)}.json"
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (run_dir / "runs").glob("*.json")}
    out = run_cli(path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "7 of 8 (arm, seed) runs done already; 1 to train" in out.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    redone = json.loads(lost.read_text())
    assert redone["final_loss"] == pytest.approx(before["strategy=max/mu-2s n=81"]["final_loss"], rel=1e-4)


def test_arms_that_would_not_share_upstream_work_are_refused(tmp_path):
    path = write_study(tmp_path, grid={"sft.steps": [10, 20]}, baseline=None, claims=[])
    with pytest.raises(ConfigError, match="sft.steps.*differs between arms"):
        arm_runs(load_study(path))
    out = run_cli(path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "study.yaml" in out.stderr


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 0]}, "seeds: must be a list of distinct"),
    ({"baseline": {"pairs.strategy": "mu/min"}}, "baseline: .* matches no arm"),
    ({"claims": [{"claim": "x", "better": {"sample.n": 4}}]}, "needs both better and worse"),
    ({"claims": [{"claim": "x", "contrast": [[1, {"sample.n": 4}]]}]}, "weights must sum to 0"),
    ({"grid": {"train.seed": [1, 2]}}, "train.seed: is set per replicate"),
    ({"colour": "blue"}, "colour: unknown study key"),
])
def test_bad_study_files_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path, **change))


def test_an_arm_without_a_step_budget_is_refused(tmp_path):
    path = write_study(tmp_path)
    study = load_study(path, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match="train.max_steps: must be > 0"):
        arm_runs(study)


def test_a_breadth_arm_keeps_representative_prompts_with_uniform_depth(finished_study, tmp_path):
    # Study C's arm shape on the finished study's shared samples: breadth compression to 6 of the
    # 24 prompts (on the shared samples, not before sampling), 3 pairs each, max/mu-2s pair first.
    from bpo_jax.balance import margin_ranked_pairs
    from bpo_jax.pairs import build_pairs
    from bpo_jax.studies.runner import arm_data, shared_config

    path, run_dir, _ = finished_study
    raw = yaml.safe_load(path.read_text())
    raw.update(grid={"sample.n": [8]}, baseline=None, claims=[],
               arms=[{"name": "balanced", "set": {"bpo.breadth_enabled": True, "bpo.num_prompts": 6,
                                                  "bpo.pairs_per_prompt": 3, "bpo.depth_allocator": "off"}}])
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    study = load_study(tmp_path / "study.yaml")
    [run, *_] = arm_runs(study)
    _, report = arm_data(study, run, shared_config(study, [run]))
    [selected] = (run_dir / "breadth").glob("*/scored_n8.jsonl")
    chosen_groups = [json.loads(line) for line in selected.read_text().splitlines()]
    groups = {json.loads(line)["id"]: json.loads(line)
              for line in (run_dir / "shared" / "scored_n8.jsonl").read_text().splitlines()}
    assert len(chosen_groups) == report["scored_prompts"] == 6
    assert all(g == groups[g["id"]] for g in chosen_groups)  # whole groups of the shared samples
    flat = [g["id"] for g in chosen_groups if max(g["rewards"]) == min(g["rewards"])]  # nothing to pair
    assert (report["prompts"], report["pairs"]) == (6 - len(flat), 3 * (6 - len(flat)))
    pairs = [json.loads(line) for line in Path(report["train_pairs"]).read_text().splitlines()]
    kept = {p["meta"]["prompt_id"] for p in pairs}
    sweet, _ = build_pairs([groups[g] for g in sorted(kept)], "max/mu-2s")
    for pick in sweet:
        mine = [(p["meta"]["chosen_index"], p["meta"]["rejected_index"]) for p in pairs if p["meta"]["prompt_id"] == pick["id"]]
        first = (pick["meta"]["chosen_index"], pick["meta"]["rejected_index"])
        assert mine == margin_ranked_pairs(groups[pick["id"]]["rewards"], 3, first=first)
