"""Gradient clustering, BPO scores and depth allocation (bpo_jax.depth) on hand-built features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bpo_jax.config import config_from_dict
from bpo_jax.depth import (
    Candidates,
    Clustering,
    allocate,
    bpo_scores,
    default_budget,
    plot_depth,
    plot_scores,
    spherical_kmeans,
)
from bpo_jax.gradients import read_feature_shards
from bpo_jax.pipeline import Run, stage_bpo


def noisy_directions(directions: np.ndarray, counts, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    x = directions[labels] + noise * rng.normal(size=(labels.size, directions.shape[1]))
    return x, labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_spherical_kmeans_recovers_direction_clusters_whatever_the_norms():
    directions = np.eye(20)[:3]
    x, truth = noisy_directions(directions, [15, 10, 5], noise=0.1)
    x *= np.random.default_rng(1).uniform(0.1, 50, size=(len(x), 1))  # cosine ignores the norm
    result = spherical_kmeans(x, 3, seed=0)
    assert same_partition(result.labels, truth)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-6)
    for c in range(3):
        member = truth[result.labels == c][0]
        assert result.centroids[c] @ directions[member] > 0.98
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert result.objective == pytest.approx(np.sum(unit * result.centroids[result.labels]), rel=1e-5)


def test_spherical_kmeans_is_seeded_and_caps_clusters_at_rows():
    x, _ = noisy_directions(np.eye(8)[:4], [6, 6, 6, 6], noise=0.6, seed=3)
    a, b = spherical_kmeans(x, 4, seed=5), spherical_kmeans(x, 4, seed=5)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centroids, b.centroids)
    few = spherical_kmeans(np.eye(3)[:2], 5)
    assert few.centroids.shape == (2, 3) and sorted(few.labels.tolist()) == [0, 1]


def test_bpo_scores_hand_computed():
    # Two clusters on the unit circle: centroid (1, 0) holds g0, g1; centroid (-1, 0) holds g2.
    g = np.array([[1.0, 0.0], [0.6, 0.8], [-0.8, 0.6]])
    clustering = Clustering(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([0, 0, 1]), 0.0)
    s = bpo_scores(g, clustering)
    mean = np.array([0.8, 1.4]) / 3
    g_bar = mean / np.hypot(*mean)  # (0.4961, 0.8682)
    np.testing.assert_allclose(s.direction, g_bar, rtol=1e-6)
    np.testing.assert_allclose(s.informativeness, [1.0, 0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(s.usefulness, [g_bar[0], 0.0], rtol=1e-6)  # U = max(0, cos): -0.496 -> 0
    np.testing.assert_allclose(s.scores, [g_bar[0], 0.6 * g_bar[0], 0.0], rtol=1e-6)


# -- allocation ---------------------------------------------------------------------------------------

# 4 prompts, 10 candidates:      0    1    2    3    4    5    6    7    8    9
GROUPS = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
SCORES = np.array([0.1, 0.9, 0.5, 0.2, 0.3, 0.05, 0.8, 0.7, 0.6, 0.0])
MARGINS = np.array([3.0, 1.0, 2.0, 0.5, 4.0, 1.0, 0.1, 0.2, 0.3, 0.4])
LENGTHS = np.array([10, 20, 30, 40, 5, 7, 9, 50, 60, 1])
CANDIDATES = Candidates(GROUPS, MARGINS, LENGTHS, SCORES)


def depths(selected: np.ndarray) -> list[int]:
    return np.bincount(GROUPS[selected], minlength=4).tolist()


def test_gradient_allocation_hand_computed():
    # ranked: each prompt's best: 1 (0.9), 4 (0.3), 5 (0.05), 6 (0.8). Then by score: 7 (0.7), 8 (0.6), 2 (0.5).
    assert allocate(CANDIDATES, "gradient", 7, base_pair="ranked").tolist() == [1, 2, 4, 5, 6, 7, 8]
    assert allocate(CANDIDATES, "gradient", 4, base_pair="ranked").tolist() == [1, 4, 5, 6]
    assert allocate(CANDIDATES, "gradient", 10, base_pair="ranked").tolist() == list(range(10))


def test_primary_base_pair_is_each_prompts_first_candidate():
    # primary (the default): prompts keep their first candidates 0, 3, 5, 6 (the first candidate
    # strategy's picks); the extra slots follow the ranking: gradient 1 (0.9), 7 (0.7), 8 (0.6).
    assert allocate(CANDIDATES, "gradient", 4).tolist() == [0, 3, 5, 6]
    assert allocate(CANDIDATES, "gradient", 7).tolist() == [0, 1, 3, 5, 6, 7, 8]
    # margin: extra slots 4 (4.0), 2 (2.0); random: the base never depends on the seed.
    assert allocate(CANDIDATES, "margin", 6).tolist() == [0, 2, 3, 4, 5, 6]
    assert all(allocate(CANDIDATES, "random", 4, seed=s).tolist() == [0, 3, 5, 6] for s in range(20))


@pytest.mark.parametrize("base_pair", ["primary", "ranked"])
@pytest.mark.parametrize("budget", range(4, 11))
@pytest.mark.parametrize("allocator", ["gradient", "uniform", "random", "length", "margin"])
def test_budget_exact_and_every_prompt_keeps_a_pair(allocator, budget, base_pair):
    selected = allocate(CANDIDATES, allocator, budget, seed=budget, base_pair=base_pair)
    assert len(selected) == budget == len(set(selected.tolist()))
    assert min(depths(selected)) >= 1


@pytest.mark.parametrize("budget", range(4, 11))
def test_higher_score_gets_the_depth(budget):
    """Beyond each prompt's own best pair, every kept candidate outscores every dropped one."""
    selected = allocate(CANDIDATES, "gradient", budget, base_pair="ranked")
    best = {g: max(np.flatnonzero(GROUPS == g), key=lambda i: SCORES[i]) for g in range(4)}
    extra = [i for i in selected if i != best[GROUPS[i]]]
    dropped = np.setdiff1d(np.arange(10), selected)
    if extra and dropped.size:
        assert SCORES[extra].min() >= SCORES[dropped].max()
    # The ranking beyond the best pairs is 7, 8 (prompt 3), 2, 3, 0, then 9 (prompt 3 again).
    assert depths(selected)[3] == {4: 1, 5: 2, 6: 3, 7: 3, 8: 3, 9: 3, 10: 4}[budget]


def test_margin_and_length_allocators_hand_computed():
    # margin: best per prompt 0 (3.0), 4 (4.0), 5, 9 (0.4); then 2 (2.0), 1 (1.0), 3 (0.5).
    assert allocate(CANDIDATES, "margin", 7, base_pair="ranked").tolist() == [0, 1, 2, 3, 4, 5, 9]
    # length: best per prompt 2 (30), 3 (40), 5, 8 (60); then 7 (50), 1 (20), 0 (10).
    assert allocate(CANDIDATES, "length", 7, base_pair="ranked").tolist() == [0, 1, 2, 3, 5, 7, 8]


def test_uniform_allocator_spreads_depth_evenly_by_margin():
    # Round 1 (best margin each): 0, 4, 5, 9. Round 2: prompt 0 -> 2 (2.0), 1 -> 3 (0.5), 3 -> 8 (0.3);
    # prompt 2 has nothing left. Round 2 is taken in margin order, so budget 6 takes 2 and 3.
    assert allocate(CANDIDATES, "uniform", 6, base_pair="ranked").tolist() == [0, 2, 3, 4, 5, 9]
    assert depths(allocate(CANDIDATES, "uniform", 7, base_pair="ranked")) == [2, 2, 1, 2]
    assert depths(allocate(CANDIDATES, "uniform", 9, base_pair="ranked")) == [3, 2, 1, 3]
    # Many prompts with deep candidate lists: depths differ by at most one.
    groups = np.repeat(np.arange(50), 6)
    margins = np.random.default_rng(0).uniform(size=groups.size)
    wide = Candidates(groups, margins, np.zeros(groups.size))
    for budget in (50, 77, 120, 299):
        d = np.bincount(groups[allocate(wide, "uniform", budget)])
        assert d.max() - d.min() <= 1 and d.sum() == budget


def test_random_allocator_is_seeded_and_unbiased():
    a, b = allocate(CANDIDATES, "random", 6, seed=1), allocate(CANDIDATES, "random", 6, seed=1)
    assert np.array_equal(a, b)
    assert any(not np.array_equal(a, allocate(CANDIDATES, "random", 6, seed=s)) for s in range(2, 6))
    # Ranked, budget 4: each prompt keeps one uniformly chosen candidate: prompt 3 has 4 candidates,
    # each kept in 1/4 of 4000 seeds (sd 27; bounds at 5 sd).
    counts = np.zeros(10)
    for seed in range(4000):
        counts[allocate(CANDIDATES, "random", 4, seed=seed, base_pair="ranked")] += 1
    assert np.all(np.abs(counts[6:10] - 1000) < 140)
    assert counts[5] == 4000


def test_allocation_errors():
    with pytest.raises(ValueError, match="between the number of prompts \\(4"):
        allocate(CANDIDATES, "margin", 3)
    with pytest.raises(ValueError, match="number of candidate pairs \\(10\\)"):
        allocate(CANDIDATES, "margin", 11)
    with pytest.raises(ValueError, match="unknown depth allocator 'best'"):
        allocate(CANDIDATES, "best", 5)
    with pytest.raises(ValueError, match="unknown base pair rule 'first'"):
        allocate(CANDIDATES, "margin", 5, base_pair="first")
    with pytest.raises(ValueError, match="needs BPO scores"):
        allocate(CANDIDATES._replace(scores=None), "gradient", 5)
    with pytest.raises(ValueError, match="Candidates.lengths has shape \\(3,\\)"):
        allocate(CANDIDATES._replace(lengths=np.zeros(3)), "margin", 5)
    assert default_budget(4, 10) == 5 and default_budget(8, 10) == 8


def test_clusters_against_the_descent_direction_get_no_depth(tmp_path):
    """End to end on synthetic features: 12 prompts whose pairs push along +e0 (the majority, so
    g_bar ~ +e0) and 4 whose pairs push along -e0. The -e0 cluster's usefulness is 0, so its prompts
    keep only their one forced pair while the budget deepens the +e0 prompts."""
    directions = np.array([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    x, truth = noisy_directions(directions, [36, 12], noise=0.15, seed=7)  # 3 pairs per prompt
    groups = np.arange(48) // 3
    clustering = spherical_kmeans(x, 2, seed=0)
    assert same_partition(clustering.labels, truth)
    scores = bpo_scores(x, clustering)
    against = clustering.labels[truth == 1][0]
    assert scores.usefulness[against] == 0.0 and scores.usefulness[1 - against] > 0.9
    selected = allocate(Candidates(groups, np.zeros(48), np.zeros(48), scores.scores), "gradient", 30)
    depth = np.bincount(groups[selected], minlength=16)
    assert depth[12:].tolist() == [1, 1, 1, 1]
    assert depth[:12].sum() == 26

    plot_depth(groups, selected, tmp_path / "depth.png")
    plot_scores(scores, selected, tmp_path / "scores.png")
    for name in ("depth.png", "scores.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the pipeline stage -------------------------------------------------------------------------------

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "data" / "tiny_tokenizer"


def scored_file(path: Path, n_prompts: int = 6) -> Path:
    """Scored groups over the tiny tokenizer's words w0..w99: 4 responses with distinct rewards each."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n_prompts):
            words = rng.integers(0, 100, size=(5, 4))
            f.write(json.dumps({
                "id": f"q{i}",
                "prompt": " ".join(f"w{w}" for w in words[0]),
                "responses": [" ".join(f"w{w}" for w in words[j, : 1 + j]) for j in range(1, 5)],
                "rewards": rng.permutation(4).astype(float).tolist(),
            }) + "\n")
    return path


def bpo_config(tmp_path: Path, **bpo) -> dict:
    init = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    return config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "model": {"init": init, "tokenizer": str(TOKENIZER)},
        "data": {"scored": str(scored_file(tmp_path / "scored.jsonl")), "max_length": 32, "max_prompt_length": 16,
                 "length_buckets": [32]},
        "lora": {"rank": 2},
        "train": {"batch_size": 8, "beta": 0.5, "optim": {"learning_rate": 0.01}},
        "bpo": {"proj_dim": 64, "feature_batch_size": 8, "num_clusters": 2, **bpo},
    })


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_bpo_gradient_allocation_end_to_end_and_resume(tmp_path, capsys):
    run = Run(bpo_config(tmp_path, warmup_steps=2))
    stage_bpo(run)
    out = run.root / "bpo"
    candidates = read_jsonl(out / "candidate_pairs.jsonl")
    report = json.loads((out / "bpo_report.json").read_text())
    train = read_jsonl(run.train_pairs)
    assert report["breadth"] == 6 and report["budget"] == default_budget(6, len(candidates)) == len(train)
    assert report["depth_candidates"]["pairs"] == len(candidates) and report["depth_allocated"]["min"] >= 1
    assert sorted({p["meta"]["prompt_id"] for p in train}) == [f"q{i}" for i in range(6)]
    # LoRA rank 2 on q, k, v, o, gate, up, down (in -> out: 32->32, 32->16, 32->16, 32->32, 32->64,
    # 32->64, 64->32): 2 * sum(in + out) = 2 * 512.
    assert report["features"]["num_params"] == 1024 and report["features"]["trainable"] == "lora"
    assert run.preference_data == run.train_pairs
    assert (out / "warmup" / "checkpoints").exists() and (out / "depth.png").exists() and (out / "scores.png").exists()

    # The allocation follows the scores of the saved features: each prompt's primary pair (its
    # first candidate: the first candidate strategy's pick), then the highest scores.
    features, index = read_feature_shards(out / "features")
    assert features.shape == (len(candidates), 64) and index.tolist() == list(range(len(candidates)))
    scores = bpo_scores(features, spherical_kmeans(features, 2, seed=0)).scores
    by_id = {c["id"]: i for i, c in enumerate(candidates)}
    picked = np.array([by_id[p["id"]] for p in train])
    np.testing.assert_allclose([p["meta"]["bpo_score"] for p in train], scores[picked], rtol=1e-6)
    groups = np.array([int(c["meta"]["prompt_id"][1:]) for c in candidates])
    primary = {g: np.flatnonzero(groups == g)[0] for g in range(6)}
    assert all(candidates[i]["meta"]["strategies"][0] == run.config.bpo.candidate_strategies[0] for i in primary.values())
    extra = [i for i in picked if i != primary[groups[i]]]
    dropped = np.setdiff1d(np.arange(len(candidates)), picked)
    assert set(primary.values()) <= set(picked.tolist())
    if extra and dropped.size:
        assert scores[extra].min() >= scores[dropped].max()

    # Done: skipped. Report lost: redone from the saved warm-up and features (nothing recomputed).
    stage_bpo(run)
    assert "[bpo] done already" in capsys.readouterr().out
    shard_times = [p.stat().st_mtime_ns for p in sorted((out / "features").glob("features-*.npz"))]
    (out / "bpo_report.json").unlink()
    stage_bpo(run)
    assert "[bpo-warmup] resumed from the checkpoint at step 2 of 2" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted((out / "features").glob("features-*.npz"))] == shard_times
    assert read_jsonl(run.train_pairs) == train


def test_stage_bpo_margin_allocator_and_off(tmp_path):
    run = Run(bpo_config(tmp_path, depth_allocator="margin", budget=9))
    stage_bpo(run)
    train = read_jsonl(run.train_pairs)
    candidates = read_jsonl(run.root / "bpo" / "candidate_pairs.jsonl")
    assert len(train) == 9 and not (run.root / "bpo" / "features").exists()
    margins = np.array([c["meta"]["margin"] for c in candidates])
    groups = np.array([c["meta"]["prompt_id"] for c in candidates])
    picked = {p["id"] for p in train}
    best = {g: candidates[np.flatnonzero(groups == g)[np.argmax(margins[groups == g])]]["id"] for g in set(groups)}
    assert set(best.values()) <= picked
    extra = [m for c, m in zip(candidates, margins) if c["id"] in picked and c["id"] not in best.values()]
    dropped = [m for c, m in zip(candidates, margins) if c["id"] not in picked]
    assert min(extra) >= max(dropped)
    # Candidates: distinct (chosen, rejected) per prompt, each naming the strategies that chose it.
    keys = [(c["meta"]["prompt_id"], c["meta"]["chosen_index"], c["meta"]["rejected_index"]) for c in candidates]
    assert len(keys) == len(set(keys)) and all(c["meta"]["strategies"] for c in candidates)

    (tmp_path / "off").mkdir()
    off = Run(bpo_config(tmp_path / "off", depth_allocator="off"))
    stage_bpo(off)
    assert not off.train_pairs.exists() and off.preference_data == off.pairs
