"""Reward-distribution pair construction: hand-worked points and strategies, every edge case,
the vectorized selector against the per-prompt reference, records, files and the plot."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpo_jax import pairs as P
from bpo_jax.pairs import (
    DEFAULT_STRATEGY,
    POINT_PAIRINGS,
    POINTS,
    REASONS,
    STRATEGIES,
    build_pairs,
    explain_pair,
    parse_strategy,
    plot_reward_distribution,
    representative_points,
    run_pairs_stage,
    select_pair,
    select_pairs,
)

# 28 integer rewards with mean 0 and population std 1 exactly: 22 zeros, and one each of
# +-1, +-2, +-3 (sum of squares 2 + 8 + 18 = 28 = n). Every point lands on an exact value; the
# zeros tie for "mu", so the lowest index (0) must win.
SYM = [0, 3, -1, 0, 2, -3, 1, -2] + [0] * 20
SYM_POINTS = {"min": 5, "mu-2s": 7, "mu-s": 2, "mu": 0, "mu+s": 6, "mu+2s": 4, "max": 1}


class FixedDraws:
    """Stands in for a numpy Generator: hands out fixed uniforms."""

    def __init__(self, *u: float):
        self.u = np.array(u)

    def random(self, size: int) -> np.ndarray:
        assert size == 2
        return self.u


@contextlib.contextmanager
def block_size(n: int):
    """Force select_pairs to cut the prompts into blocks of about n responses."""
    saved, P._BLOCK = P._BLOCK, n
    try:
        yield
    finally:
        P._BLOCK = saved


# ------------------------------------------------------------------ points


def test_symmetric_example_hits_every_point_exactly():
    assert np.mean(SYM) == 0 and np.std(SYM) == 1
    assert representative_points(SYM) == SYM_POINTS
    # a positive affine map by powers of two is exact and must not move any point
    assert representative_points([0.5 * r + 10 for r in SYM]) == SYM_POINTS


def test_skewed_example_nearest_by_hand():
    # r = [1, 2, 3, 4, 10, 0]: mu = 20/6 = 3.333, s = sqrt(130/6 - mu^2) = 3.249
    # mu-2s = -3.16 -> 0 (idx 5); mu-s = 0.084 -> 0 (idx 5, 0.08 away vs 0.92 for the 1);
    # mu = 3.333 -> 3 (idx 2); mu+s = 6.58 -> 4 (idx 3, 2.58 vs 3.42 for the 10); mu+2s = 9.83 -> 10
    r = [1, 2, 3, 4, 10, 0]
    assert np.std(r) == pytest.approx(3.2489, abs=1e-4)
    assert representative_points(r) == {
        "min": 5, "mu-2s": 5, "mu-s": 5, "mu": 2, "mu+s": 3, "mu+2s": 4, "max": 4}


def test_ties_go_to_lowest_index():
    # [2, 0, 0, 2]: mu = 1, s = 1; every response is exactly 1 away from mu -> index 0
    assert representative_points([2, 0, 0, 2]) == {
        "min": 1, "mu-2s": 1, "mu-s": 1, "mu": 0, "mu+s": 0, "mu+2s": 0, "max": 0}
    assert representative_points([1, 3, 3, 0])["max"] == 1


def test_segment_statistics_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=50) * 7 + 2
    offsets = np.array([0, 3, 20, 50])
    mu, s = P._segment_mean_std(x, offsets[:-1], np.diff(offsets))
    for i in range(3):
        seg = x[offsets[i]:offsets[i + 1]]
        assert mu[i] == pytest.approx(np.mean(seg), rel=1e-12)
        assert s[i] == pytest.approx(np.std(seg), rel=1e-12)


# ------------------------------------------------------------------ strategies


def test_strategy_names():
    assert len(POINT_PAIRINGS) == 21 and len(set(POINT_PAIRINGS)) == 21
    for name in POINT_PAIRINGS:
        hi, lo = name.split("/")
        assert POINTS.index(hi) > POINTS.index(lo)
    assert DEFAULT_STRATEGY == "max/mu-2s" and len(STRATEGIES) == 25
    with pytest.raises(ValueError, match="must lie above.*did you mean max/mu-2s"):
        parse_strategy("mu-2s/max")
    with pytest.raises(ValueError, match="unknown pair strategy 'best'.*max/mu-2s"):
        select_pair([1, 2], "best")


@pytest.mark.parametrize("strategy, expected", [
    ("max/mu-2s", (1, 7)), ("max/min", (1, 5)), ("mu+s/mu-s", (6, 2)), ("mu/min", (0, 5)),
    ("mu+2s/mu", (4, 0)), ("max/second", (1, 4)), ("scalable", (1, 2)),
])
def test_strategies_on_symmetric_example(strategy, expected):
    # scalable: the first 5 samples are [0, 3, -1, 0, 2] -> rejected = the -1 at index 2
    assert select_pair(SYM, strategy) == expected


def test_all_point_pairings_follow_representative_points():
    for name in POINT_PAIRINGS:
        hi, lo = name.split("/")
        assert select_pair(SYM, name) == (SYM_POINTS[hi], SYM_POINTS[lo])


def test_max_second_skips_ties_at_the_top():
    assert select_pair([5, 3, 5, 4], "max/second") == (0, 3)


def test_random_strategies_with_fixed_draws():
    r = [1, 5, 2, 3]
    # max/random: index floor(0.5 * 3) = 1 among the others [0, 2, 3] -> 2
    assert select_pair(r, "max/random", FixedDraws(0.5, 0.9)) == (1, 2)
    # random/random: a = floor(0.5 * 4) = 2; b = floor(0.9 * 3) = 2 among the others -> 3;
    # r[3] = 3 > r[2] = 2, so 3 is chosen
    assert select_pair(r, "random/random", FixedDraws(0.5, 0.9)) == (3, 2)
    # a = floor(0.3 * 4) = 1; b = floor(0.0 * 3) = 0 stays 0 (below a); r[1] = 5 wins
    assert select_pair(r, "random/random", FixedDraws(0.3, 0.0)) == (1, 0)


def test_random_strategies_are_uniform_over_the_allowed_indices():
    n_prompts, r = 30_000, np.array([1.0, 5.0, 2.0, 3.0])
    flat, offsets = np.tile(r, n_prompts), np.arange(n_prompts + 1) * 4
    sel = select_pairs(flat, offsets, "max/random", seed=1)
    assert sel.valid.all() and (sel.chosen == 1).all()
    counts = np.bincount(sel.rejected, minlength=4)
    assert counts[1] == 0 and np.allclose(counts[[0, 2, 3]] / n_prompts, 1 / 3, atol=0.015)
    sel = select_pairs(flat, offsets, "random/random", seed=2)
    assert sel.valid.all() and (r[sel.chosen] > r[sel.rejected]).all()
    pair_ids = np.minimum(sel.chosen, sel.rejected) * 4 + np.maximum(sel.chosen, sel.rejected)
    _, freq = np.unique(pair_ids, return_counts=True)
    assert freq.size == 6 and np.allclose(freq / n_prompts, 1 / 6, atol=0.015)


def test_rng_none_means_seed_zero_and_matches_select_pairs():
    r = np.arange(10.0)
    expect = select_pairs(r, [0, 10], "max/random", seed=0)
    assert select_pair(r, "max/random") == (expect.chosen[0], expect.rejected[0])
    assert select_pair(r, "max/random", np.random.default_rng(0)) == select_pair(r, "max/random")


@given(st.lists(st.integers(-10**6, 10**6), min_size=2, max_size=5))
def test_samuelson_collapse_for_n_up_to_5(r):
    # every value lies within sqrt(n-1) <= 2 std of the mean, so mu-2s is at or below the minimum
    # (integers keep float rounding far below the gaps between values; the bound is about reals)
    points = representative_points(r)
    assert points["mu-2s"] == points["min"]
    assert select_pair(r, "max/mu-2s") == select_pair(r, "max/min")


def test_mu_2s_differs_from_min_once_the_minimum_is_an_outlier():
    assert select_pair(SYM, "max/mu-2s") != select_pair(SYM, "max/min")


def test_length_penalty_changes_the_selection():
    r, lengths = [1.0, 0.9, 0.0], [100, 10, 10]
    assert select_pair(r, "max/min") == (0, 2)
    # scores = r - 0.01 * length = [0.0, 0.8, -0.1]
    assert select_pair(r, "max/min", lengths=lengths, length_penalty=0.01) == (1, 2)
    with pytest.raises(ValueError, match="lengths"):
        select_pair(r, "max/min", length_penalty=0.01)


def test_scalable_keeps_its_rejected_response_as_n_grows():
    rewards = np.random.default_rng(7).normal(size=256)
    fixed = int(np.argmin(rewards[:5]))
    best_so_far, min_moved = -np.inf, False
    for n in (5, 6, 8, 16, 32, 64, 128, 256):
        chosen, rejected = select_pair(rewards[:n], "scalable")
        assert rejected == fixed
        assert chosen == int(np.argmax(rewards[:n])) and rewards[chosen] >= best_so_far
        best_so_far = rewards[chosen]
        min_moved |= select_pair(rewards[:n], "max/min")[1] != fixed
    assert min_moved  # unlike max/min, whose rejected response keeps sliding down the tail
    assert select_pair(rewards[:64], "scalable", k_rej=12)[1] == int(np.argmin(rewards[:12]))


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("rewards, strategy, options, reason", [
    ([], "max/mu-2s", {}, "too_few_responses"),
    ([1.0], "max/min", {}, "too_few_responses"),
    ([2.0, 2.0, 2.0], "max/min", {}, "all_equal"),
    ([0.1] * 3, "max/mu-2s", {}, "all_equal"),  # mean 0.1 * 3 / 3 rounds, max == min still holds
    ([1.0, 2.0], "max/min", {"truncated": [True, True]}, "no_eligible_chosen"),
    # mu = 9, s = 3: both mu and mu-s = 6 are nearest to the first 10
    ([0] + [10] * 9, "mu/mu-s", {}, "same_response"),
    # max/random with u = 0 picks index 0 of the others [1, 2]: reward 5 == max
    ([5.0, 5.0, 1.0], "max/random", {"rng": FixedDraws(0.0, 0.0)}, "same_reward"),
    ([10.0, 10.0, 0.0], "max/mu", {"truncated": [True, False, False]}, "same_reward"),
    # only the 0 may be chosen; mu-s = 2 - sqrt(2) is nearest the 1 -> chosen below rejected
    ([0, 1, 2, 3, 4], "mu+s/mu-s", {"truncated": [False, True, True, True, True]}, "inverted"),
    ([1.0, 5.0], "max/second", {"truncated": [False, True]}, "inverted"),
    ([0.0, 1.0, 1.2], "max/min", {"min_margin": 1.5}, "below_margin"),
    ([0.0, np.nan], "max/min", {"skip_bad_rows": True}, "bad_rewards"),
])
def test_skip_reasons(rewards, strategy, options, reason):
    options = dict(options)
    rng = options.pop("rng", None)
    assert explain_pair(rewards, strategy, rng, **options) == (-1, -1, reason)
    assert select_pair(rewards, strategy, rng, **options) is None
    offsets = [0, len(rewards)]
    flat_options = {k: np.asarray(v) if isinstance(v, list) else v for k, v in options.items()}
    if rng is None:
        sel = select_pairs(np.asarray(rewards, float), offsets, strategy, **flat_options)
        assert REASONS[sel.reason[0]] == reason and not sel.valid[0] and sel.chosen[0] == -1


def test_margin_at_the_threshold_is_kept():
    assert select_pair([0.0, 1.0, 1.25], "max/min", min_margin=1.25) == (2, 0)


def test_truncated_responses_are_never_chosen_but_may_be_rejected():
    assert select_pair([0.0, 9.0, 5.0], "max/min", truncated=[True, True, False]) == (2, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rewards_are_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"field 'rewards'.*at response 1"):
        select_pair([0.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"prompt 1, response 2: field 'rewards'"):
        select_pairs([0.0, 1.0, 2.0, 3.0, bad], [0, 2, 5])
    groups = [{"prompt": "a", "responses": ["x", "y"], "rewards": [0.0, 1.0]},
              {"id": "b", "prompt": "b", "responses": ["x", "y"], "rewards": [bad, 1.0]}]
    message = r"row 1 \(id='b'\): field 'rewards': non-finite .*position 0"
    with pytest.raises(ValueError, match=message):
        build_pairs(groups)
    pairs, report = build_pairs(groups, skip_bad_rows=True)
    assert [p["id"] for p in pairs] == [0] and report["skipped"]["bad_rewards"] == 1


def test_record_shape_errors_name_row_and_field():
    good = {"prompt": "p", "responses": ["a", "b"], "rewards": [0.0, 1.0]}
    cases = [
        ({"prompt": "p", "responses": ["a", "b"], "rewards": [1.0]},
         r"row 1: field 'rewards'.*got 1 items"),
        ({"prompt": "p", "responses": ["a"], "rewards": ["1"]},
         r"row 1: field 'rewards'.*found '1'"),
        ({"prompt": "p", "responses": ["a"]}, r"row 1: field 'rewards' is missing"),
        ({"prompt": "p", "responses": ["a", "b"], "rewards": [0, 1], "truncated": [1, 0]},
         r"row 1: field 'truncated'"),
        ("not a dict", r"row 1: expected an object"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            build_pairs([good, bad])
    with pytest.raises(ValueError, match=r"row 0: field 'lengths' is missing"):
        build_pairs([{"prompt": "p", "responses": [["m"], ["n"]], "rewards": [0, 1]}],
                    length_penalty=0.1)
    with pytest.raises(ValueError, match=r"row 0: field 'lengths': non-finite value nan at pos"):
        build_pairs([dict(good, lengths=[3, float("nan")])], length_penalty=0.1)
    with pytest.raises(ValueError, match=r"prompt 0, response 1: field 'lengths'"):
        select_pairs([0.0, 1.0], [0, 2], lengths=[3.0, np.inf], length_penalty=0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="offsets"):
        select_pairs([1.0, 2.0], [0, 3])
    with pytest.raises(ValueError, match="k_rej"):
        select_pair([1.0, 2.0], "scalable", k_rej=0)
    with pytest.raises(ValueError, match="min_margin"):
        select_pairs([1.0, 2.0], [0, 2], min_margin=-1)


# ------------------------------------------------------------------ vectorized == reference


REWARD_VALUES = st.one_of(
    st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]),  # few values: many ties
    st.floats(-1e3, 1e3, allow_nan=False),
)
RESPONSE = st.tuples(REWARD_VALUES, st.booleans(), st.integers(1, 60), st.integers(0, 40))


@settings(max_examples=200, deadline=None)
@given(
    prompts=st.lists(st.lists(RESPONSE, max_size=9), max_size=12),
    strategy=st.sampled_from(STRATEGIES),
    seed=st.integers(0, 2**32 - 1),
    min_margin=st.sampled_from([0.0, 0.5, 2.0]),
    length_penalty=st.sampled_from([0.0, 0.05]),
    k_rej=st.integers(1, 6),
    use_truncated=st.booleans(),
    block=st.sampled_from([P._BLOCK, 1, 7]),
)
def test_select_pairs_equals_a_loop_over_select_pair(prompts, strategy, seed, min_margin,
                                                     length_penalty, k_rej, use_truncated, block):
    # a response is (reward, truncated?, length, x); x == 0 replaces the reward by NaN or inf
    def reward(resp):
        value, _, _, x = resp
        return {0: np.nan, 1: np.inf}.get(x, value)

    rewards = [np.array([reward(r) for r in p], dtype=float) for p in prompts]
    truncs = [np.array([r[1] and r[3] % 3 == 0 for r in p], dtype=bool) for p in prompts]
    lengths = [np.array([r[2] for r in p], dtype=float) for p in prompts]
    offsets = np.cumsum([0] + [len(p) for p in prompts])
    options = dict(min_margin=min_margin, length_penalty=length_penalty, k_rej=k_rej,
                   skip_bad_rows=True)
    flat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)
    with block_size(block):
        sel = select_pairs(flat(rewards), offsets, strategy, seed,
                           truncated=flat(truncs).astype(bool) if use_truncated else None,
                           lengths=flat(lengths), **options)
    rng = np.random.default_rng(seed)
    for i in range(len(prompts)):
        expect = explain_pair(rewards[i], strategy, rng, lengths=lengths[i],
                              truncated=truncs[i] if use_truncated else None, **options)
        got = (int(sel.chosen[i]), int(sel.rejected[i]), REASONS[sel.reason[i]])
        assert got == expect, f"prompt {i}"
    assert (sel.valid == (sel.reason == 0)).all()


def test_select_pairs_equals_the_loop_on_realistic_rewards():
    rng = np.random.default_rng(11)
    lengths = rng.integers(0, 40, size=300)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    rewards = rng.normal(size=offsets[-1]) * rng.uniform(0.1, 5) + rng.uniform(-3, 3)
    truncated = rng.random(offsets[-1]) < 0.2
    for strategy in STRATEGIES:
        with block_size(1000):
            sel = select_pairs(rewards, offsets, strategy, 5, truncated=truncated, min_margin=0.1)
        draws = np.random.default_rng(5)
        for i in range(lengths.size):
            span = slice(offsets[i], offsets[i + 1])
            expect = explain_pair(rewards[span], strategy, draws, truncated=truncated[span],
                                  min_margin=0.1)
            assert (sel.chosen[i], sel.rejected[i], REASONS[sel.reason[i]]) == expect


# ------------------------------------------------------------------ records and files


GROUPS = [
    {"id": "sym", "prompt": "p0", "responses": [f"r{j}" for j in range(28)], "rewards": SYM},
    {"id": "one", "prompt": "p1", "responses": ["only"], "rewards": [1.0]},
    {"id": "flat", "prompt": "p2", "responses": ["a", "b"], "rewards": [3.0, 3.0]},
    {"prompt": "p3", "responses": ["a", "b", "c", "d"], "rewards": [1.0, 4.0, 2.0, 0.5],
     "truncated": [False, True, False, False]},
]


def test_build_pairs_content_and_report():
    pairs, report = build_pairs(GROUPS, "max/mu-2s")
    assert [p["id"] for p in pairs] == ["sym", 3]
    sym, last = pairs
    assert (sym["prompt"], sym["chosen"], sym["rejected"]) == ("p0", "r1", "r7")
    meta = sym["meta"]
    assert (meta["chosen_index"], meta["rejected_index"]) == (1, 7)
    assert (meta["chosen_point"], meta["rejected_point"]) == ("max", "mu-2s")
    assert (meta["chosen_reward"], meta["rejected_reward"]) == (3, -2)
    assert (meta["margin"], meta["n"]) == (5, 28)
    assert (meta["chosen_z"], meta["rejected_z"]) == (3.0, -2.0)  # mu = 0, s = 1
    # last prompt: "d" at 4.0 is truncated; n = 4 <= 5 so mu-2s is the minimum (0.5)
    r = np.array([1.0, 4.0, 2.0, 0.5])
    assert (last["chosen"], last["rejected"]) == ("c", "d")
    assert last["meta"]["chosen_z"] == pytest.approx((2.0 - r.mean()) / r.std())
    assert last["meta"]["rejected_z"] == pytest.approx((0.5 - r.mean()) / r.std())
    assert report["prompts_in"] == 4 and report["pairs_out"] == 2
    assert report["skipped"]["too_few_responses"] == 1 and report["skipped"]["all_equal"] == 1
    assert sum(report["skipped"].values()) == 2
    assert report["margin"]["max"] == 5 and report["margin"]["min"] == 1.5

    pairs, _ = build_pairs(GROUPS, "max/mu-2s", exclude_truncated=False)
    assert pairs[1]["chosen"] == "b"


def test_build_pairs_length_penalty_from_response_text():
    groups = [{"prompt": "p", "responses": ["long" * 10, "ok", "bad"], "rewards": [1.0, 0.9, 0.0]}]
    assert build_pairs(groups, "max/min")[0][0]["chosen"] == "long" * 10
    pairs, report = build_pairs(groups, "max/min", length_penalty=0.01)
    assert pairs[0]["chosen"] == "ok" and pairs[0]["meta"]["chosen_reward"] == 0.9
    assert report["options"]["length_penalty"] == 0.01


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_from_arrays_and_from_records(tmp_path):
    rng = np.random.default_rng(0)
    offsets = np.arange(0, 16 * 200 + 1, 16)
    rewards = rng.normal(size=offsets[-1])
    sel = select_pairs(rewards, offsets)
    plot_reward_distribution((rewards, offsets), sel, tmp_path / "arrays.png")
    pairs, _ = build_pairs(GROUPS)
    plot_reward_distribution(GROUPS, pairs, tmp_path / "records.png", title="t")
    plot_reward_distribution([], [], tmp_path / "empty.png")
    assert all(_is_png(tmp_path / f) for f in ("arrays.png", "records.png", "empty.png"))


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_run_pairs_stage_writes_outputs(tmp_path):
    scored = tmp_path / "scored.jsonl"
    _write_lines(scored, [json.dumps(g) for g in GROUPS[:2]] + [""] + [json.dumps(GROUPS[3])])
    report = run_pairs_stage(scored, tmp_path / "out", strategy="max/min", min_margin=1.0)
    out = tmp_path / "out"
    written = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    expected, _ = build_pairs([GROUPS[0], GROUPS[1], GROUPS[3]], "max/min", min_margin=1.0)
    assert written == expected and written[1]["id"] == 2  # default id: the record's position
    assert json.loads((out / "pairs_report.json").read_text()) == report
    assert report["pairs_out"] == 2 and report["skipped"]["too_few_responses"] == 1
    assert report["input"] == str(scored) and report["options"]["min_margin"] == 1.0
    assert _is_png(out / "pairs_rewards.png")
    assert sorted(p.name for p in out.iterdir()) == [
        "pairs.jsonl", "pairs_report.json", "pairs_rewards.png"]  # no temp files left


def test_run_pairs_stage_errors_name_file_and_line(tmp_path):
    scored = tmp_path / "scored.jsonl"
    _write_lines(scored, [json.dumps(GROUPS[0]), "{not json"])
    with pytest.raises(ValueError, match=r"scored.jsonl:2: invalid JSON"):
        run_pairs_stage(scored, tmp_path / "out")
    bad = dict(GROUPS[0], rewards=SYM[:-1])
    _write_lines(scored, [json.dumps(GROUPS[3]), "", json.dumps(bad)])
    with pytest.raises(ValueError, match=r"scored.jsonl:3 \(id='sym'\): field 'rewards'"):
        run_pairs_stage(scored, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_pairs_stage(tmp_path / "missing.jsonl", tmp_path / "out")
    assert not (tmp_path / "out").exists()
