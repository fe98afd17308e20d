"""BPO's dynamic knowledge depth: gradient clustering, informativeness x usefulness, budgeted allocation.

BPO (Wang et al., NAACL 2025), as we understand it, gives informative, useful prompts more preference
pairs (depth) under a fixed total. The paper's body was not available to us: that reading and
every operational definition here are ours, not the paper's:

  features   g_j: the unit-norm projected gradient of candidate pair j's DPO loss (gradients.py).
  clusters   spherical k-means (cosine) into C clusters; centroids are unit vectors.
  I_j        informativeness = cos(g_j, centroid of j's cluster): how typical j is of its cluster.
  g_bar      optimization direction = the normalized mean of all g_j.
  U_c        usefulness of cluster c = max(0, cos(centroid_c, g_bar)): clusters pointing against
             the overall descent direction get no extra depth.
  s_j        score = I_j * U_c(j).

Allocation under a global budget M of pairs (B prompts <= M <= number of candidates): every prompt
keeps one base pair (so breadth is never lost), then the remaining M - B slots go down an
allocator's best-first ranking of all candidates. The base pair is, by default ("primary"), the
prompt's first candidate: the pick of the first candidate strategy, the sweet spot max/mu-2s
unless configured otherwise, so depth allocation only decides the extra pairs; "ranked" takes
the prompt's first candidate in the allocator's ranking instead. (On the demo task, "ranked"
gradient allocation replaced 100 of 256 sweet-spot pairs by smaller-margin ones and trained
worse than random allocation: 0.589 vs 0.613 mean reward.)
Allocators (one interface, `allocate`):
  gradient  by descending s_j (BPO)
  margin    by descending reward margin (chosen - rejected reward)
  length    by descending length (chosen + rejected response tokens)
  random    a seeded random permutation
  uniform   round robin: every prompt's best-margin pair, then every prompt's second, ...; so
            depths differ by at most one wherever candidates allow (ties by margin, then index)
Ties always go to the lower candidate index.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from bpo_jax.io_utils import pyplot, save_figure
from bpo_jax.pairs import build_pairs

ALLOCATORS = ("gradient", "uniform", "random", "length", "margin")
BASE_PAIRS = ("primary", "ranked")


# -- candidates ---------------------------------------------------------------------------------------


def candidate_pairs(
    groups: Sequence[Mapping[str, Any]], strategies: Sequence[str], **options: Any
) -> tuple[list[dict], dict[str, Any]]:
    """Every distinct pair that any of `strategies` picks for a prompt (pairs.build_pairs, same
    options), ordered by prompt then by the first strategy that picked it.

    Records get id "<group id>/<chosen>-<rejected>" and meta.strategies (all strategies that
    picked the pair) and meta.prompt_id; the rest of meta is build_pairs' for the first strategy.
    """
    ids = [g.get("id", i) for i, g in enumerate(groups)]
    repeated = [gid for gid, count in Counter(ids).items() if count > 1]
    if repeated:
        raise ValueError(f"scored groups: field 'id' repeats {repeated[0]!r}; candidate pairs need one group per id")
    row_of = {gid: i for i, gid in enumerate(ids)}
    found: dict[tuple[int, int, int], dict] = {}
    first_rank: dict[tuple[int, int, int], int] = {}
    per_strategy = {}
    for rank, strategy in enumerate(strategies):
        pairs, report = build_pairs(groups, strategy, **options)
        per_strategy[strategy] = {"pairs_out": report["pairs_out"], "skipped": report["skipped"]}
        for p in pairs:
            meta = p["meta"]
            key = (row_of[p["id"]], meta["chosen_index"], meta["rejected_index"])
            if key in found:
                found[key]["meta"]["strategies"].append(strategy)
            else:
                first_rank[key] = rank
                found[key] = {**p, "id": f"{p['id']}/{key[1]}-{key[2]}",
                              "meta": {**meta, "prompt_id": p["id"], "strategies": [strategy]}}
    order = sorted(found, key=lambda k: (k[0], first_rank[k], k[1], k[2]))
    report = {"strategies": per_strategy, "prompts_in": len(groups), "prompts_with_pairs": len({k[0] for k in found}),
              "candidates": len(order)}
    return [found[k] for k in order], report


# -- spherical k-means ------------------------------------------------------------------------------


class Clustering(NamedTuple):
    centroids: np.ndarray  # float32 [C, d], unit rows
    labels: np.ndarray  # int64 [n]
    objective: float  # sum of cos(g_j, own centroid)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def spherical_kmeans(
    features: np.ndarray, num_clusters: int, *, seed: int = 0, n_init: int = 3, max_iter: int = 100
) -> Clustering:
    """Cosine k-means: assign each row to its most similar centroid, centroid = normalized sum.

    k-means++ seeding on the cosine distance 1 - cos, `n_init` seeded restarts, the best objective
    kept. A cluster left empty is re-seeded with the row least similar to its own centroid.
    num_clusters is capped at the number of rows.
    """
    x = unit_rows(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty [n, d] array; got shape {np.shape(features)}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1; got {num_clusters}")
    k = min(num_clusters, x.shape[0])
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(n_init, 1)):
        result = _lloyd(x, _kmeans_pp(x, k, rng), max_iter)
        if best is None or result.objective > best.objective:
            best = result
    return best


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = [x[rng.integers(x.shape[0])]]
    distance = 1.0 - x @ centroids[0]
    for _ in range(1, k):
        weight = np.clip(distance, 0.0, None) ** 2
        total = weight.sum()
        pick = rng.choice(x.shape[0], p=weight / total) if total > 0 else rng.integers(x.shape[0])
        centroids.append(x[pick])
        distance = np.minimum(distance, 1.0 - x @ x[pick])
    return np.stack(centroids)


def _lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int) -> Clustering:
    k = centroids.shape[0]
    labels = None
    for _ in range(max_iter):
        sims = x @ centroids.T
        new = np.argmax(sims, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        own = sims[np.arange(x.shape[0]), labels]
        for c in np.flatnonzero(np.bincount(labels, minlength=k) == 0):
            far = int(np.argmin(own))
            sums[c], own[far] = x[far], np.inf
        centroids = unit_rows(sums)
    sims = x @ centroids.T
    labels = np.argmax(sims, axis=1)
    return Clustering(centroids, labels.astype(np.int64), float(sims[np.arange(x.shape[0]), labels].sum()))


# -- scores -----------------------------------------------------------------------------------------


class DepthScores(NamedTuple):
    informativeness: np.ndarray  # [n] I_j
    usefulness: np.ndarray  # [C] U_c
    direction: np.ndarray  # [d] g_bar
    scores: np.ndarray  # [n] s_j = I_j * U_c(j)


def bpo_scores(features: np.ndarray, clustering: Clustering) -> DepthScores:
    """I_j, U_c, g_bar and s_j of the module docstring."""
    g = unit_rows(features)
    labels = clustering.labels
    informativeness = np.sum(g * clustering.centroids[labels], axis=1)
    mean = g.mean(axis=0)
    norm = np.linalg.norm(mean)
    direction = mean / norm if norm > 0 else mean
    usefulness = np.maximum(clustering.centroids @ direction, 0.0)
    return DepthScores(informativeness, usefulness, direction, informativeness * usefulness[labels])


# -- allocation -------------------------------------------------------------------------------------


class Candidates(NamedTuple):
    """What the allocators rank: one entry per candidate pair."""

    groups: np.ndarray  # int [n], the prompt each candidate belongs to
    margins: np.ndarray  # float [n], chosen - rejected reward
    lengths: np.ndarray  # int [n], chosen + rejected response tokens
    scores: np.ndarray | None = None  # float [n], BPO s_j (needed by the gradient allocator)


def _descending(values: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(values, np.float64), kind="stable")


def _gradient_order(c: Candidates, seed: int) -> np.ndarray:
    if c.scores is None:
        raise ValueError("the gradient allocator needs BPO scores (Candidates.scores)")
    return _descending(c.scores)


def _uniform_order(c: Candidates, seed: int) -> np.ndarray:
    by_margin = np.lexsort((np.arange(len(c.groups)), -np.asarray(c.margins, np.float64), c.groups))
    rank = np.empty(len(c.groups), np.int64)
    sorted_groups = c.groups[by_margin]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    rank[by_margin] = np.arange(len(c.groups)) - np.repeat(starts, np.diff(np.r_[starts, len(c.groups)]))
    return np.lexsort((np.arange(len(c.groups)), -np.asarray(c.margins, np.float64), rank))


_ORDERS: dict[str, Callable[[Candidates, int], np.ndarray]] = {
    "gradient": _gradient_order,
    "uniform": _uniform_order,
    "random": lambda c, seed: np.random.default_rng(seed).permutation(len(c.groups)),
    "length": lambda c, seed: _descending(c.lengths),
    "margin": lambda c, seed: _descending(c.margins),
}


def default_budget(num_prompts: int, num_candidates: int) -> int:
    """Half the candidate pairs, but at least one per prompt."""
    return max(num_prompts, num_candidates // 2)


def allocate(
    candidates: Candidates, allocator: str, budget: int, *, seed: int = 0, base_pair: str = "primary"
) -> np.ndarray:
    """Indices (ascending) of the `budget` candidates kept: every prompt's base pair, then the
    rest of the allocator's ranking (module docstring)."""
    if allocator not in _ORDERS:
        raise ValueError(f"unknown depth allocator {allocator!r}; expected one of {', '.join(ALLOCATORS)}")
    if base_pair not in BASE_PAIRS:
        raise ValueError(f"unknown base pair rule {base_pair!r}; expected one of {', '.join(BASE_PAIRS)}")
    groups = np.asarray(candidates.groups)
    n = len(groups)
    for name in ("margins", "lengths") + (("scores",) if candidates.scores is not None else ()):
        if np.shape(getattr(candidates, name)) != (n,):
            raise ValueError(f"Candidates.{name} has shape {np.shape(getattr(candidates, name))}; expected ({n},)")
    num_prompts = len(np.unique(groups))
    if not num_prompts <= budget <= n:
        raise ValueError(
            f"pair budget {budget} must lie between the number of prompts ({num_prompts}: each keeps >= 1 pair) "
            f"and the number of candidate pairs ({n})"
        )
    if base_pair == "primary":
        base = np.zeros(n, bool)
        base[np.unique(groups, return_index=True)[1]] = True
        # Ranked as if their margin were infinite, base pairs are every prompt's first round for
        # the uniform allocator; the other rankings only order the pairs beyond them.
        margins = np.where(base, np.inf, np.asarray(candidates.margins, np.float64))
        order = _ORDERS[allocator](candidates._replace(groups=groups, margins=margins), seed)
    else:
        order = _ORDERS[allocator](candidates._replace(groups=groups), seed)
        base = np.zeros(n, bool)
        base[order[np.unique(groups[order], return_index=True)[1]]] = True
    keep = base.copy()
    rest = order[~keep[order]]
    keep[rest[: budget - num_prompts]] = True
    return np.flatnonzero(keep)


# -- plots --------------------------------------------------------------------------------------------


def plot_depth(groups: np.ndarray, selected: np.ndarray, path: str | Path, title: str = "") -> None:
    """PNG: prompts by number of pairs (depth K), candidates vs. the allocation."""
    before = np.bincount(np.unique(groups, return_inverse=True)[1])
    after = np.bincount(np.unique(groups, return_inverse=True)[1][selected], minlength=before.size)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ks = np.arange(0, max(before.max(), 1) + 1)
    width = 0.4
    ax.bar(ks - width / 2, np.bincount(before, minlength=ks.size), width, label=f"candidates (mean K {before.mean():.2f})", color="0.7")
    ax.bar(ks + width / 2, np.bincount(after, minlength=ks.size), width, label=f"allocated (mean K {after.mean():.2f})", color="#4c72b0")
    ax.set_xlabel("K (pairs per prompt)")
    ax.set_ylabel("prompts")
    ax.set_title(title or "Knowledge depth before and after allocation")
    ax.legend()
    save_figure(fig, path)


def plot_scores(scores: DepthScores, selected: np.ndarray, path: str | Path) -> None:
    """PNG: distribution of s_j for kept and dropped candidates, and U_c per cluster."""
    keep = np.zeros(scores.scores.size, bool)
    keep[selected] = True
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(min(scores.scores.min(), 0.0), max(scores.scores.max(), 1e-6), 41)
    left.hist(scores.scores[keep], bins=bins, alpha=0.7, label=f"allocated ({keep.sum()})", color="#4c72b0")
    left.hist(scores.scores[~keep], bins=bins, alpha=0.7, label=f"dropped ({(~keep).sum()})", color="0.6")
    left.set_xlabel("score s = I x U")
    left.set_ylabel("candidate pairs")
    left.legend()
    right.bar(np.arange(scores.usefulness.size), scores.usefulness, color="#dd8452")
    right.set_xlabel("cluster")
    right.set_ylabel("usefulness U = max(0, cos(centroid, g_bar))")
    save_figure(fig, path)


# -- report -------------------------------------------------------------------------------------------


def depth_report(groups: np.ndarray, selected: np.ndarray) -> dict:
    """Breadth B and depth K (pairs per prompt) of the candidates and of the allocation."""
    _, prompt = np.unique(groups, return_inverse=True)
    before = np.bincount(prompt)
    after = np.bincount(prompt[selected], minlength=before.size)

    def describe(k: np.ndarray) -> dict:
        ks, counts = np.unique(k, return_counts=True)
        return {"pairs": int(k.sum()), "mean": float(k.mean()), "min": int(k.min()), "max": int(k.max()),
                "histogram": {int(a): int(b) for a, b in zip(ks, counts)}}

    return {"breadth": int(before.size), "depth_candidates": describe(before), "depth_allocated": describe(after)}
