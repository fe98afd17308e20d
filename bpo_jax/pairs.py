"""Reward-distribution pair construction ("Finding the Sweet Spot", Xiao et al. 2025).

From the paper: sample n on-policy responses per prompt, score them with a reward model, place
seven representative points on each prompt's reward distribution, study the 21 pairings of them,
and recommend chosen = max, rejected = the response nearest mu - 2 sigma. It reports that as n
grows max/min stalls or degrades while max/mu-2s keeps improving (AlpacaEval 2 LC,
Llama-3-8B-Instruct + ArmoRM, n = 400: 49.1 vs 42.0). Our choices, not the paper's: the population
std (ddof=0), lowest-index ties, the edge-case rules below, the `scalable` strategy, and any
explanation of *why* max/mu-2s scales.

Each prompt has n sampled responses with scalar rewards r. With mu = mean(r) and s = population
std (ddof=0), seven representative points describe where a response sits in that distribution:

    min, mu-2s, mu-s, mu, mu+s, mu+2s, max

min and max are the exact extremes; the response "at" mu+k*s is the one whose reward is nearest
mu + k*s. Every tie goes to the lowest response index. A strategy "A/B" pairs the response at
point A (chosen) with the response at point B (rejected), A above B: all 21 = C(7, 2) pairings are
selectable by name. The paper's recommended rule is max/mu-2s (our default). Why it scales is our
reading, not something we take from the paper: the minimum of many samples drifts into the far
tail (an outlier), while the response nearest mu-2s stays a typical bad answer.

Samuelson's inequality: every value lies within sqrt(n-1)*s of the mean. For n <= 5, sqrt(n-1) <= 2,
so mu-2s lies at or below the minimum and the response nearest it *is* the minimum: max/mu-2s and
max/min coincide there. The two only differ once n >= 6.

Beyond the 21 pairings:
  scalable       ours, not a rule from the paper (an experiment on the same idea): chosen = argmax
                 over all n; rejected = argmin over the first k_rej samples (in generation order),
                 so the rejected response stays put as more samples are drawn.
  max/random     chosen = max; rejected uniform among the other n-1 responses.
  max/second     chosen = max; rejected = best response scoring strictly below it (hardest pair).
  random/random  two distinct uniform responses; the higher-scoring one is chosen.
Options on any strategy: length_penalty lam selects on score = reward - lam * length (statistics,
points and all checks use the score); min_margin skips pairs whose score gap is below it; truncated
responses (no EOS) are never chosen (they may still be rejected); the statistics and min/max that
define the points always use all n responses.

Randomness: random strategies consume exactly two uniforms in [0, 1) per prompt. select_pairs draws
them as `default_rng(seed).random((n_prompts, 2))`, row i for prompt i; that is the same stream as
calling `rng.random(2)` once per prompt, so looping select_pair over prompts in order with one
`rng = default_rng(seed)` reproduces select_pairs exactly. A uniform u picks index floor(u * m).

Skips (no pair; counted by reason, checked in this order): bad_rewards (non-finite value, only with
skip_bad_rows), too_few_responses (n < 2), all_equal (max == min), no_eligible_chosen (every
candidate for chosen is truncated), same_response, same_reward, inverted (chosen scores below
rejected, or for max/second nothing scores below chosen: possible only when truncation moves
chosen), below_margin.

`select_pair`/`explain_pair` is the plain per-prompt reference; `select_pairs` does many prompts at
once with segment reductions (no Python loop over prompts); `build_pairs` and `run_pairs_stage` turn
scored group records into pair records.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from bpo_jax.data.readers import is_tfds_reference, raw_rows
from bpo_jax.data.schema import DataError
from bpo_jax.io_utils import pyplot, save_figure, write_json, write_jsonl

POINTS = ("min", "mu-2s", "mu-s", "mu", "mu+s", "mu+2s", "max")
_SIGMAS = {"mu-2s": -2.0, "mu-s": -1.0, "mu": 0.0, "mu+s": 1.0, "mu+2s": 2.0}
POINT_PAIRINGS = tuple(f"{hi}/{lo}" for i, lo in enumerate(POINTS) for hi in POINTS[i + 1 :])
SPECIAL_STRATEGIES = ("scalable", "max/random", "max/second", "random/random")
STRATEGIES = POINT_PAIRINGS + SPECIAL_STRATEGIES
DEFAULT_STRATEGY = "max/mu-2s"
REASONS = (
    "ok",
    "bad_rewards",
    "too_few_responses",
    "all_equal",
    "no_eligible_chosen",
    "same_response",
    "same_reward",
    "inverted",
    "below_margin",
)
_CODE = {name: code for code, name in enumerate(REASONS)}


@dataclass(frozen=True)
class _Strategy:
    """A parsed strategy: how chosen/rejected are located, and their labels for pair metadata."""

    kind: str  # "points" or one of SPECIAL_STRATEGIES
    chosen: str
    rejected: str

    @property
    def random(self) -> bool:
        return self.kind in ("max/random", "random/random")


def parse_strategy(name: str, k_rej: int = 5) -> _Strategy:
    """Validate a strategy name; the error lists every valid name."""
    if name in POINT_PAIRINGS:
        hi, lo = name.split("/")
        return _Strategy("points", hi, lo)
    if name in SPECIAL_STRATEGIES:
        hi, lo = {"scalable": ("max", f"min@first{k_rej}")}.get(name, name.split("/"))
        return _Strategy(name, hi, lo)
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) == 2 and all(p in POINTS for p in parts):
        raise ValueError(f"pair strategy {name!r}: the chosen point must lie above the rejected "
                         f"point (order {', '.join(POINTS)}); did you mean {parts[1]}/{parts[0]}?")
    raise ValueError(f"unknown pair strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")


def _check_options(k_rej: int, min_margin: float, length_penalty: float) -> None:
    if int(k_rej) != k_rej or k_rej < 1:
        raise ValueError(f"k_rej must be a positive integer, got {k_rej!r}")
    if not np.isfinite(min_margin) or min_margin < 0:
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin!r}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be finite, got {length_penalty!r}")


def _segment_mean_std(values: np.ndarray, starts: np.ndarray, counts: np.ndarray):
    """Mean and population std of each contiguous segment (all non-empty).

    Both implementations compute the statistics through this one function, so their sums agree bit
    for bit and nearest-point ties resolve identically in select_pair and select_pairs.
    """
    mu = np.add.reduceat(values, starts) / counts
    dev = values - np.repeat(mu, counts)
    np.multiply(dev, dev, out=dev)
    return mu, np.sqrt(np.add.reduceat(dev, starts) / counts)


def _draw_index(u, m):
    """Map uniforms u in [0, 1) to indices 0..m-1 (clipped: u * m can round up to m)."""
    return np.minimum(np.floor(u * m).astype(np.int64), m - 1)


def _selection_scores(rewards: np.ndarray, lengths, length_penalty: float) -> np.ndarray:
    if length_penalty == 0:
        return rewards
    if lengths is None:
        raise ValueError("length_penalty needs response lengths (field 'lengths')")
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.shape != rewards.shape:
        raise ValueError(f"field 'lengths': {lengths.shape[0] if lengths.ndim else 'a scalar'} "
                         f"values for {rewards.shape[0]} rewards")
    return rewards - length_penalty * lengths


def _nonfinite_field(rewards: np.ndarray, pos: int) -> str:
    """Name the field responsible for a non-finite score at flat position pos."""
    return "rewards" if not np.isfinite(rewards[pos]) else "lengths"


# ------------------------------------------------------------------ reference, one prompt


def _nearest(score: np.ndarray, point: str, allowed: np.ndarray, mu=None, s=None) -> int:
    """Index of the response at `point` among the allowed ones (np.arg* take the first tie);
    mu and s are needed for the mu+k*s points only."""
    idx = np.flatnonzero(allowed)
    vals = score[idx]
    if point == "max":
        return int(idx[np.argmax(vals)])
    if point == "min":
        return int(idx[np.argmin(vals)])
    return int(idx[np.argmin(np.abs(vals - (mu + _SIGMAS[point] * s)))])


def representative_points(rewards: Sequence[float] | np.ndarray) -> dict[str, int]:
    """Index of the response at each of the seven points (ties -> lowest index)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"field 'rewards': need a non-empty 1-D list, got shape {r.shape}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise ValueError(f"field 'rewards': non-finite value {r[bad[0]]} at response {bad[0]}")
    mu, s = _segment_mean_std(r, np.array([0]), np.array([r.size]))
    everyone = np.ones(r.size, dtype=bool)
    return {p: _nearest(r, p, everyone, mu[0], s[0]) for p in POINTS}


def explain_pair(
    rewards: Sequence[float] | np.ndarray,
    strategy: str = DEFAULT_STRATEGY,
    rng: np.random.Generator | None = None,
    *,
    truncated: Sequence[bool] | np.ndarray | None = None,
    lengths: Sequence[float] | np.ndarray | None = None,
    length_penalty: float = 0.0,
    min_margin: float = 0.0,
    k_rej: int = 5,
    skip_bad_rows: bool = False,
) -> tuple[int, int, str]:
    """Reference selection for one prompt: (chosen, rejected, reason); (-1, -1, reason) on a skip.

    rng feeds random strategies (two uniforms per call, always consumed first); None means
    default_rng(0). See the module docstring for the options and the skip reasons.
    """
    spec = parse_strategy(strategy, k_rej)
    _check_options(k_rej, min_margin, length_penalty)
    u = (rng if rng is not None else np.random.default_rng(0)).random(2) if spec.random else None
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"field 'rewards': need a 1-D list, got shape {r.shape}")
    score = _selection_scores(r, lengths, length_penalty)
    n = r.size
    eligible = np.ones(n, bool) if truncated is None else ~np.asarray(truncated, dtype=bool)
    if eligible.shape != r.shape:
        raise ValueError(f"field 'truncated': {eligible.size} flags for {n} rewards")

    def skip(reason: str) -> tuple[int, int, str]:
        return -1, -1, reason

    bad = np.flatnonzero(~np.isfinite(score))
    if bad.size:
        if skip_bad_rows:
            return skip("bad_rewards")
        j = int(bad[0])
        field = _nonfinite_field(r, j)
        value = r[j] if field == "rewards" else np.asarray(lengths, dtype=np.float64)[j]
        raise ValueError(f"field {field!r}: non-finite value {value} at response {j}")
    if n < 2:
        return skip("too_few_responses")
    if score.max() == score.min():
        return skip("all_equal")
    if spec.kind == "random/random":
        a = int(_draw_index(u[0], n))
        b = int(_draw_index(u[1], n - 1))
        b += b >= a
        c, rej = (b, a) if score[b] > score[a] else (a, b)
        if not eligible[c]:
            return skip("no_eligible_chosen")
    else:
        if not eligible.any():
            return skip("no_eligible_chosen")
        everyone = np.ones(n, bool)
        if spec.kind == "points":
            mu, s = _segment_mean_std(score, np.array([0]), np.array([n]))
            c = _nearest(score, spec.chosen, eligible, mu[0], s[0])
            rej = _nearest(score, spec.rejected, everyone, mu[0], s[0])
        else:
            c = _nearest(score, "max", eligible)
            if spec.kind == "max/random":
                rej = int(_draw_index(u[0], n - 1))
                rej += rej >= c
            elif spec.kind == "max/second":
                below = score < score[c]
                if not below.any():
                    return skip("inverted")
                rej = _nearest(score, "max", below)
            else:  # scalable
                rej = _nearest(score, "min", np.arange(n) < k_rej)
    if c == rej:
        return skip("same_response")
    if score[c] == score[rej]:
        return skip("same_reward")
    if score[c] < score[rej]:
        return skip("inverted")
    if score[c] - score[rej] < min_margin:
        return skip("below_margin")
    return c, rej, "ok"


def select_pair(
    rewards: Sequence[float] | np.ndarray,
    strategy: str = DEFAULT_STRATEGY,
    rng: np.random.Generator | None = None,
    **options: Any,
) -> tuple[int, int] | None:
    """(chosen, rejected) response indices for one prompt, or None when it yields no valid pair.

    Options as in explain_pair (truncated, lengths, length_penalty, min_margin, k_rej,
    skip_bad_rows).
    """
    c, rej, reason = explain_pair(rewards, strategy, rng, **options)
    return (c, rej) if reason == "ok" else None


# ------------------------------------------------------------------ vectorized, many prompts


class PairSelection(NamedTuple):
    """Per-prompt result of select_pairs; chosen/rejected are local indices, -1 where not valid."""

    chosen: np.ndarray
    rejected: np.ndarray
    valid: np.ndarray
    reason: np.ndarray  # int8 codes into REASONS

    def reason_counts(self) -> dict[str, int]:
        counts = np.bincount(self.reason, minlength=len(REASONS))
        return {name: int(k) for name, k in zip(REASONS, counts)}


class _Segments:
    """Non-empty contiguous segments of a flat array; reductions return one value per segment."""

    def __init__(self, starts: np.ndarray, counts: np.ndarray):
        self.starts, self.counts = starts, counts

    def spread(self, per_segment: np.ndarray) -> np.ndarray:
        return np.repeat(per_segment, self.counts)

    def owner(self, positions: np.ndarray) -> np.ndarray:
        """Segment number of each (sorted) flat position."""
        return np.searchsorted(self.starts, positions, side="right") - 1

    def count(self, mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.owner(np.flatnonzero(mask)), minlength=self.starts.size)

    def first_equal(self, key: np.ndarray, best: np.ndarray) -> np.ndarray:
        """Local index of the first element equal to its segment's best (every segment has one)."""
        hits = np.flatnonzero(key == self.spread(best))
        owners = self.owner(hits)
        first = np.ones(hits.size, dtype=bool)
        np.not_equal(owners[1:], owners[:-1], out=first[1:])
        return hits[first] - self.starts

    def argmin(self, key: np.ndarray) -> np.ndarray:
        return self.first_equal(key, np.minimum.reduceat(key, self.starts))

    def argmax(self, key: np.ndarray) -> np.ndarray:
        return self.first_equal(key, np.maximum.reduceat(key, self.starts))


def _vector_point(score, seg, point, stats, blocked):
    """Local index of the response at `point` per segment; `blocked` responses are excluded."""
    if point in ("max", "min"):
        key = score
        if blocked is not None:
            key = score.copy()
            key[blocked] = -np.inf if point == "max" else np.inf
        return seg.argmax(key) if point == "max" else seg.argmin(key)
    mu, s = stats
    key = seg.spread(mu + _SIGMAS[point] * s)
    np.abs(np.subtract(score, key, out=key), out=key)  # |score - target|, reusing one buffer
    if blocked is not None:
        key[blocked] = np.inf
    return seg.argmin(key)


def _vector_candidates(spec, score, seg, blocked, u, k_rej):
    """Local (chosen, rejected) per segment, plus the strategy's early skips in precedence order."""
    n = seg.counts
    if spec.kind == "random/random":
        a = _draw_index(u[:, 0], n)
        b = _draw_index(u[:, 1], n - 1)
        b += b >= a
        a, b = np.where(n < 2, 0, a), np.where(n < 2, 0, b)  # n < 2 is skipped anyway
        b_wins = score[seg.starts + b] > score[seg.starts + a]
        c, rej = np.where(b_wins, b, a), np.where(b_wins, a, b)
        flags = [] if blocked is None else [(blocked[seg.starts + c], "no_eligible_chosen")]
        return c, rej, flags
    flags = [] if blocked is None else [(seg.count(blocked) == n, "no_eligible_chosen")]
    if spec.kind == "points":
        stats = _segment_mean_std(score, seg.starts, n)
        c = _vector_point(score, seg, spec.chosen, stats, blocked)
        rej = _vector_point(score, seg, spec.rejected, stats, None)
        return c, rej, flags
    c = _vector_point(score, seg, "max", None, blocked)
    if spec.kind == "max/random":
        rej = np.maximum(_draw_index(u[:, 0], n - 1), 0)
        rej += rej >= c
        return c, np.minimum(rej, n - 1), flags
    if spec.kind == "max/second":
        key = score.copy()
        key[score >= seg.spread(score[seg.starts + c])] = -np.inf
        best = np.maximum.reduceat(key, seg.starts)
        return c, seg.first_equal(key, best), flags + [(best == -np.inf, "inverted")]
    # scalable: argmin over the first k_rej samples of each segment (a small (segments, k) gather)
    cols = np.arange(min(k_rej, int(n.max())))
    pos = np.minimum(seg.starts[:, None] + cols, score.size - 1)
    head = np.where(cols < n[:, None], score[pos], np.inf)
    return c, np.argmin(head, axis=1), flags


def _check_ragged(rewards_flat, offsets) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(rewards_flat, dtype=np.float64)
    off = np.asarray(offsets)
    if x.ndim != 1:
        raise ValueError(f"rewards_flat must be 1-D, got shape {x.shape}")
    if off.ndim != 1 or off.size < 1 or off.dtype.kind not in "iu":
        raise ValueError("offsets must be a 1-D integer array of length n_prompts + 1")
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != x.size or np.any(np.diff(off) < 0):
        raise ValueError(f"offsets must start at 0, end at len(rewards_flat) = {x.size} and never "
                         f"decrease; got {off[0]} ... {off[-1]}")
    return x, off


def select_pairs(
    rewards_flat: Sequence[float] | np.ndarray,
    offsets: Sequence[int] | np.ndarray,
    strategy: str = DEFAULT_STRATEGY,
    seed: int = 0,
    *,
    truncated: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    length_penalty: float = 0.0,
    min_margin: float = 0.0,
    k_rej: int = 5,
    skip_bad_rows: bool = False,
) -> PairSelection:
    """Select one pair per prompt; prompt i owns rewards_flat[offsets[i]:offsets[i+1]].

    Same result as explain_pair on every prompt (random strategies: row i of
    default_rng(seed).random((n_prompts, 2))); truncated/lengths are flat like the rewards.
    A non-finite value raises ValueError naming the prompt, unless skip_bad_rows. Work goes in
    blocks of whole prompts (~_BLOCK responses each) using segment reductions within a block.
    """
    spec = parse_strategy(strategy, k_rej)
    _check_options(k_rej, min_margin, length_penalty)
    r, offsets = _check_ragged(rewards_flat, offsets)
    n_prompts = offsets.size - 1
    u = np.random.default_rng(seed).random((n_prompts, 2)) if spec.random else None
    score = _selection_scores(r, lengths, length_penalty)
    blocked = None
    if truncated is not None:
        blocked = np.asarray(truncated, dtype=bool)
        if blocked.shape != r.shape:
            raise ValueError(f"truncated: {blocked.size} flags for {r.size} rewards")
    reason = np.zeros(n_prompts, dtype=np.int8)
    bad_pos = np.flatnonzero(~np.isfinite(score))
    if bad_pos.size:
        bad_prompt = np.searchsorted(offsets, bad_pos, side="right") - 1
        if not skip_bad_rows:
            i, j = int(bad_prompt[0]), int(bad_pos[0] - offsets[bad_prompt[0]])
            field = _nonfinite_field(r, int(bad_pos[0]))
            value = (r if field == "rewards" else np.asarray(lengths, np.float64))[bad_pos[0]]
            raise ValueError(f"prompt {i}, response {j}: field {field!r} is not finite ({value})")
        reason[bad_prompt] = _CODE["bad_rewards"]
        score = score.copy()
        score[bad_pos] = 0.0  # keep NaN out of the reductions; these prompts are already skipped
    chosen = np.full(n_prompts, -1, dtype=np.int64)
    rejected = np.full(n_prompts, -1, dtype=np.int64)
    # Blocks of whole prompts with ~_BLOCK responses keep temporaries cache- and allocator-friendly.
    cuts = np.searchsorted(offsets, np.arange(_BLOCK, r.size, _BLOCK))
    bounds = np.unique(np.concatenate([[0], cuts, [n_prompts]]))
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        a, b = offsets[lo], offsets[hi]
        _select_block(spec, score[a:b], offsets[lo:hi + 1] - a,
                      None if blocked is None else blocked[a:b], None if u is None else u[lo:hi],
                      k_rej, min_margin, chosen[lo:hi], rejected[lo:hi], reason[lo:hi])
    return PairSelection(chosen, rejected, reason == 0, reason)


_BLOCK = 1 << 17


def _select_block(spec, score, offsets, blocked, u, k_rej, min_margin, chosen, rejected, reason):
    """select_pairs on one block of prompts, writing into its chosen/rejected/reason slices."""

    def flag(where: np.ndarray, mask: np.ndarray, name: str) -> None:
        sel = where[mask]
        reason[sel[reason[sel] == 0]] = _CODE[name]

    counts = np.diff(offsets)
    flag(np.arange(counts.size), counts < 2, "too_few_responses")
    nonempty = np.flatnonzero(counts > 0)
    if nonempty.size == 0:
        return
    if blocked is not None and not blocked.any():
        blocked = None
    seg = _Segments(offsets[nonempty], counts[nonempty])
    flag(nonempty, np.maximum.reduceat(score, seg.starts) == np.minimum.reduceat(score, seg.starts),
         "all_equal")
    u = None if u is None else u[nonempty]
    c, rej, early = _vector_candidates(spec, score, seg, blocked, u, k_rej)
    for mask, name in early:
        flag(nonempty, mask, name)
    sc, sr = score[seg.starts + c], score[seg.starts + rej]
    flag(nonempty, c == rej, "same_response")
    flag(nonempty, sc == sr, "same_reward")
    flag(nonempty, sc < sr, "inverted")
    flag(nonempty, sc - sr < min_margin, "below_margin")
    ok = reason[nonempty] == 0
    chosen[nonempty[ok]], rejected[nonempty[ok]] = c[ok], rej[ok]


# ------------------------------------------------------------------ records and files


class _Flat(NamedTuple):
    """Scored groups flattened into ragged arrays."""

    rewards: np.ndarray
    offsets: np.ndarray
    truncated: np.ndarray | None
    lengths: np.ndarray | None


def _row_label(groups, labels, i) -> str:
    label = labels[i] if labels is not None else f"row {i}"
    rec = groups[i]
    return f"{label} (id={rec['id']!r})" if isinstance(rec, Mapping) and "id" in rec else label


def _flatten_groups(groups, labels=None, need_lengths=False) -> _Flat:
    """Validate group records and concatenate their per-response fields."""
    rewards, truncs, lens, sizes = [], [], [], []
    for i, rec in enumerate(groups):
        row = _row_label(groups, labels, i)
        if not isinstance(rec, Mapping):
            raise ValueError(f"{row}: expected an object, got {type(rec).__name__}")
        for field in ("prompt", "responses", "rewards"):
            if field not in rec:
                raise ValueError(f"{row}: field {field!r} is missing")
        resp = rec["responses"]
        _check_list(resp, lambda v: True, "responses", f"{row}: field 'responses'")
        n = len(resp)
        _check_list(rec["rewards"], _is_number, f"{n} numbers (one per response)",
                    f"{row}: field 'rewards'", n)
        if rec.get("truncated") is not None:
            _check_list(rec["truncated"], lambda v: isinstance(v, bool), f"{n} booleans",
                        f"{row}: field 'truncated'", n)
        if need_lengths:
            if rec.get("lengths") is not None:
                _check_list(rec["lengths"], _is_number, f"{n} numbers", f"{row}: field 'lengths'",
                            n)
            elif not all(isinstance(t, str) for t in resp):
                raise ValueError(f"{row}: field 'lengths' is missing, and the responses are not "
                                 f"plain strings whose length could be used")
            lens.append(rec.get("lengths") or [len(t) for t in resp])
        rewards.append(rec["rewards"])
        truncs.append(rec.get("truncated") or [False] * n)
        sizes.append(n)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    flat = np.fromiter(chain.from_iterable(rewards), dtype=np.float64, count=total)
    trunc_flat = np.fromiter(chain.from_iterable(truncs), dtype=bool, count=total)
    len_flat = None
    if need_lengths:
        len_flat = np.fromiter(chain.from_iterable(lens), dtype=np.float64, count=total)
    return _Flat(flat, offsets, trunc_flat if trunc_flat.any() else None, len_flat)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_list(values: Any, ok, what: str, where: str, size: int | None = None) -> None:
    """Raise ValueError at `where` unless values is a list (of `size` items) all passing ok."""
    if not isinstance(values, list) or (size is not None and len(values) != size):
        got = f"{len(values)} items" if isinstance(values, list) else type(values).__name__
        raise ValueError(f"{where}: expected a list of {what}, got {got}")
    for j, v in enumerate(values):
        if not ok(v):
            raise ValueError(f"{where}: expected a list of {what}, found {v!r} at position {j}")


def _ragged_zscores(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """z of every value within its prompt; 0 throughout a prompt with zero or non-finite spread."""
    counts = np.diff(offsets)
    nonempty = np.flatnonzero(counts > 0)
    if nonempty.size == 0:
        return np.zeros_like(values)
    seg = _Segments(offsets[nonempty], counts[nonempty])
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # inf/NaN rows -> 0
        mu, s = _segment_mean_std(values, seg.starts, seg.counts)
        return np.where(seg.spread(s > 0), (values - seg.spread(mu)) / seg.spread(s), 0.0)


def build_pairs(
    groups: Sequence[Mapping[str, Any]],
    strategy: str = DEFAULT_STRATEGY,
    *,
    seed: int = 0,
    min_margin: float = 0.0,
    length_penalty: float = 0.0,
    k_rej: int = 5,
    exclude_truncated: bool = True,
    skip_bad_rows: bool = False,
    row_labels: Sequence[str] | None = None,
) -> tuple[list[dict], dict]:
    """Scored groups {id?, prompt, responses, rewards, truncated?, lengths?} -> (pairs, report).

    Pair records are {id, prompt, chosen, rejected, meta}; id defaults to the row index. meta holds
    the raw rewards, their z-scores within the prompt (0 when all rewards are equal), the point
    labels, n and the raw reward margin. With length_penalty, lengths come from the record's
    'lengths' field, else the character length of each response. row_labels name rows in errors
    (e.g. "scored.jsonl:12"); default "row i".
    """
    labels = parse_strategy(strategy, k_rej)
    flat = _flatten_groups(groups, row_labels, need_lengths=length_penalty != 0)
    sel = select_pairs(
        flat.rewards, flat.offsets, strategy, seed,
        truncated=flat.truncated if exclude_truncated else None, lengths=flat.lengths,
        length_penalty=length_penalty, min_margin=min_margin, k_rej=k_rej, skip_bad_rows=True)
    bad = np.flatnonzero(sel.reason == _CODE["bad_rewards"])
    if bad.size and not skip_bad_rows:
        i = int(bad[0])
        span = slice(flat.offsets[i], flat.offsets[i + 1])
        field = "rewards" if not np.isfinite(flat.rewards[span]).all() else "lengths"
        row = (flat.rewards if field == "rewards" else flat.lengths)[span]
        j = int(np.flatnonzero(~np.isfinite(row))[0])
        raise ValueError(f"{_row_label(groups, row_labels, i)}: field {field!r}: non-finite value "
                         f"{row[j]} at position {j}")
    valid = np.flatnonzero(sel.valid)
    c_pos = flat.offsets[valid] + sel.chosen[valid]
    r_pos = flat.offsets[valid] + sel.rejected[valid]
    z = _ragged_zscores(flat.rewards, flat.offsets)
    counts = np.diff(flat.offsets)
    pairs = []
    for i, c, rj, pc, pr in zip(valid.tolist(), sel.chosen[valid].tolist(),
                                sel.rejected[valid].tolist(), c_pos.tolist(), r_pos.tolist()):
        rec = groups[i]
        pairs.append({
            "id": rec.get("id", i),
            "prompt": rec["prompt"],
            "chosen": rec["responses"][c],
            "rejected": rec["responses"][rj],
            "meta": {
                "strategy": strategy,
                "chosen_index": c, "rejected_index": rj,
                "chosen_point": labels.chosen, "rejected_point": labels.rejected,
                "chosen_reward": float(flat.rewards[pc]),
                "rejected_reward": float(flat.rewards[pr]),
                "chosen_z": float(z[pc]), "rejected_z": float(z[pr]),
                "n": int(counts[i]),
                "margin": float(flat.rewards[pc] - flat.rewards[pr]),
            },
        })
    skipped = {k: v for k, v in sel.reason_counts().items() if k != "ok"}
    report = {
        "strategy": strategy,
        "options": {"seed": seed, "min_margin": min_margin, "length_penalty": length_penalty,
                    "k_rej": k_rej, "exclude_truncated": exclude_truncated,
                    "skip_bad_rows": skip_bad_rows},
        "prompts_in": len(groups),
        "pairs_out": len(pairs),
        "skipped": skipped,
        "responses_per_prompt": _summary(counts),
        "margin": _summary([p["meta"]["margin"] for p in pairs]),
        "chosen_z": _summary([p["meta"]["chosen_z"] for p in pairs]),
        "rejected_z": _summary([p["meta"]["rejected_z"] for p in pairs]),
    }
    return pairs, report


def _summary(values) -> dict[str, float] | None:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


def plot_reward_distribution(
    data: Sequence[Mapping[str, Any]] | tuple[np.ndarray, np.ndarray],
    pairs: Sequence[Mapping[str, Any]] | PairSelection,
    path: str | Path,
    *,
    title: str | None = None,
) -> None:
    """PNG of within-prompt reward z-scores, the seven points, and where chosen/rejected fell.

    data: scored groups, or (rewards_flat, offsets). pairs: pair records from build_pairs (their
    meta z-scores are used), or a PairSelection over the same (rewards_flat, offsets).
    Prompts with fewer than two finite rewards or zero spread are left out of the histogram.
    """
    if isinstance(data, tuple):
        values, offsets = _check_ragged(*data)
    else:
        flat = _flatten_groups(data)
        values, offsets = flat.rewards, flat.offsets
    z_all = _ragged_zscores(values, offsets)
    counts = np.diff(offsets)
    nonempty = np.flatnonzero(counts > 0)
    z_lo, z_hi = np.full(counts.size, np.nan), np.full(counts.size, np.nan)
    if nonempty.size:
        z_lo[nonempty] = np.minimum.reduceat(z_all, offsets[nonempty])
        z_hi[nonempty] = np.maximum.reduceat(z_all, offsets[nonempty])
    usable = z_hi > z_lo  # false for NaN, empty, single-response and zero-spread prompts
    z, z_min, z_max = z_all[np.repeat(usable, counts)], z_lo[usable], z_hi[usable]
    if isinstance(pairs, PairSelection):
        ok = np.flatnonzero(pairs.valid)
        chosen_z = z_all[offsets[ok] + pairs.chosen[ok]]
        rejected_z = z_all[offsets[ok] + pairs.rejected[ok]]
    else:
        chosen_z = np.array([p["meta"]["chosen_z"] for p in pairs], dtype=np.float64)
        rejected_z = np.array([p["meta"]["rejected_z"] for p in pairs], dtype=np.float64)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    everything = np.concatenate([z, chosen_z, rejected_z, [-3.0, 3.0]])
    bins = np.linspace(max(everything.min(), -8.0) - 0.25, min(everything.max(), 8.0) + 0.25, 81)
    step = dict(histtype="step", lw=2)
    for zs, label, style in ((z, "all responses", dict(color="0.82")),
                             (chosen_z, "chosen", dict(step, color="tab:green")),
                             (rejected_z, "rejected", dict(step, color="tab:red"))):
        if zs.size:
            ax.hist(zs, bins=bins, density=True, label=f"{label} ({zs.size})", **style)
    for name, k in _SIGMAS.items():
        ax.axvline(k, color="0.35", ls=":", lw=1)
        ax.annotate(name, (k, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom")
    for name, zs, colour in (("min", z_min, "tab:purple"), ("max", z_max, "tab:blue")):
        if zs.size:
            m = float(np.median(zs))
            ax.axvline(m, color=colour, ls="--", lw=1.2, label=f"typical {name} (median z={m:.2f})")
    ax.set_xlabel("reward z-score within prompt ((r - mu) / s)")
    ax.set_ylabel("density")
    ax.set_title(title or "Reward distribution and selected pairs", pad=18)
    if z.size:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no prompt with two or more distinct rewards", transform=ax.transAxes,
                ha="center")
    save_figure(fig, path)


def _read_scored(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a scored-groups file (JSONL, Parquet or TFDS) and a 'file:line' label for each."""
    groups, labels = [], []
    for where, _, row in raw_rows(path):
        if isinstance(row, DataError):
            raise row
        groups.append(row)
        labels.append(where)
    return groups, labels


def run_pairs_stage(
    scored_path: str | Path,
    out_dir: str | Path,
    strategy: str = DEFAULT_STRATEGY,
    **options: Any,
) -> dict:
    """CLI stage: scored.jsonl -> out_dir/{pairs.jsonl, pairs_rewards.png, pairs_report.json}.

    options go to build_pairs. Every file is written atomically; the report is written last, so its
    presence means the stage finished.
    """
    scored_path, out_dir = Path(scored_path), Path(out_dir)
    if not scored_path.is_file() and not is_tfds_reference(scored_path):
        raise FileNotFoundError(f"{scored_path}: scored groups file not found")
    groups, labels = _read_scored(scored_path)
    pairs, report = build_pairs(groups, strategy, row_labels=labels, **options)
    outputs = {name: str(out_dir / name)
               for name in ("pairs.jsonl", "pairs_rewards.png", "pairs_report.json")}
    write_jsonl(outputs["pairs.jsonl"], pairs)
    plot_reward_distribution(groups, pairs, outputs["pairs_rewards.png"],
                             title=f"{scored_path.name}: {strategy}")
    report = {"input": str(scored_path), "outputs": outputs, **report}
    write_json(outputs["pairs_report.json"], report)
    return report
