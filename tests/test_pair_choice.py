"""What decides the trained pairs when BPO is on: pairs.strategy's pick is every prompt's base pair
under depth allocation, and uniform balancing (bpo.pairs_per_prompt) starts from it too.

Expectations come from pairs.build_pairs (the pairs stage's own selection) and hand-ranked margins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpo_jax.balance import margin_ranked_pairs
from bpo_jax.config import ConfigError, load_config
from bpo_jax.pairs import build_pairs
from bpo_jax.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]
# 12 rewards per prompt with a long lower tail: max/min and max/mu-2s pick different rejected responses.
REWARDS = [
    [0.9, 0.5, 0.55, 0.45, 0.5, 0.0, 0.6, 0.5, 0.4, 0.55, 0.5, 0.45],
    [0.2, 0.7, 0.65, 1.0, 0.7, 0.75, 0.6, 0.1, 0.7, 0.65, 0.7, 0.72],
    [0.5, 0.5, 0.4, 0.6, 0.3, 0.9, 0.55, 0.45, 0.0, 0.5, 0.52, 0.48],
]


def scored_file(tmp_path: Path) -> Path:
    path = tmp_path / "scored.jsonl"
    with open(path, "w") as f:
        for i, rewards in enumerate(REWARDS):
            responses = [" ".join(str((i + j + k) % 10) for k in range(4)) for j in range(len(rewards))]
            f.write(json.dumps({"id": f"p{i}", "prompt": f"sort {i} 3 2 1 =", "responses": responses, "rewards": rewards}) + "\n")
    return path


def config(tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.scored={scored_file(tmp_path)}", "sft.enabled=false",
        "bpo.breadth_enabled=false", *overrides])


def train_pairs(run) -> list[dict]:
    return [json.loads(line) for line in run.train_pairs.read_text().splitlines()]


def picks(strategy: str) -> dict[str, tuple[int, int]]:
    groups = [{"id": f"p{i}", "prompt": "x", "responses": [str(j) for j in range(len(r))], "rewards": r} for i, r in enumerate(REWARDS)]
    pairs, _ = build_pairs(groups, strategy)
    return {p["id"]: (p["meta"]["chosen_index"], p["meta"]["rejected_index"]) for p in pairs}


def run_stages(cfg):
    run_pipeline(cfg, "pairs")
    return run_pipeline(cfg, "bpo")


def test_the_strategies_disagree_on_this_data():
    assert picks("max/min") != picks("max/mu-2s")


@pytest.mark.parametrize("strategy", ["max/min", "max/mu-2s", "mu+s/mu-s"])
def test_depth_allocation_keeps_the_pairs_strategy_pick_as_base_pair(tmp_path, strategy):
    # budget = number of prompts: only the base pairs are trained, whatever the allocator ranks first.
    run = run_stages(config(tmp_path, f"pairs.strategy={strategy}", "bpo.depth_allocator=margin", "bpo.budget=3"))
    got = {p["meta"]["prompt_id"]: (p["meta"]["chosen_index"], p["meta"]["rejected_index"]) for p in train_pairs(run)}
    assert got == picks(strategy)


def test_uniform_balancing_starts_from_the_strategy_pair_then_goes_by_margin(tmp_path):
    run = run_stages(config(tmp_path, "pairs.strategy=max/mu-2s", "bpo.depth_allocator=off", "bpo.pairs_per_prompt=2"))
    pairs = train_pairs(run)
    base = picks("max/mu-2s")
    for i, rewards in enumerate(REWARDS):
        mine = [(p["meta"]["chosen_index"], p["meta"]["rejected_index"]) for p in pairs if p["meta"]["prompt_id"] == f"p{i}"]
        assert mine == margin_ranked_pairs(rewards, 2, first=base[f"p{i}"])
        assert mine[0] == base[f"p{i}"] and len(mine) == 2
    report = json.loads((run.root / "bpo" / "bpo_report.json").read_text())
    assert (report["pairs_out"], report["k"], report["first_pair_strategy"]) == (6, 2, "max/mu-2s")


def test_margin_ranked_pairs_with_a_first_pair_by_hand():
    r = [0.1, 0.9, 0.5, 0.0]  # margins: (1,3) .9, (1,0) .8, (2,3) .5, (1,2) .4, (2,0) .4, (0,3) .1
    assert margin_ranked_pairs(r, 2) == [(1, 3), (1, 0)]
    assert margin_ranked_pairs(r, 2, first=(2, 0)) == [(2, 0), (1, 3)]
    assert margin_ranked_pairs(r, 3, max_uses=1, first=(2, 0)) == [(2, 0), (1, 3)]  # every response used once
    with pytest.raises(ValueError, match="two distinct responses"):
        margin_ranked_pairs(r, 2, first=(1, 1))


def test_uniform_balancing_with_depth_allocation_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="bpo.pairs_per_prompt: uniform balancing replaces depth allocation"):
        config(tmp_path, "bpo.pairs_per_prompt=2", "bpo.depth_allocator=gradient")
