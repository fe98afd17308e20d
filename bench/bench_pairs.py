"""Pair selection throughput: vectorized select_pairs vs a per-prompt Python loop over select_pair.

    python -m bench.bench_pairs [--prompts 1000000 --responses 32 --loop-prompts 20000]

The loop is timed on the first --loop-prompts prompts and its per-prompt rate extrapolated; the
two are timed in alternation (so a change in machine load hits both) and medians are reported. The
loop's pairs are checked against select_pairs' on the same prompts. Prints a markdown table row and
returns a dict of the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bpo_jax.pairs import DEFAULT_STRATEGY, STRATEGIES, select_pair, select_pairs

TITLE = "Sweet-spot pair construction: select_pairs vs per-prompt loop"
TARGET_SPEEDUP = 50.0
SIZES = ("cpu", "gpu")  # one host workload, independent of the model shape: not repeated at smollm2
TARGET_SECONDS = 3.0  # for 1,000,000 prompts x 32 responses
HEADER = ("| benchmark | size | select_pairs | vectorized rate | per-prompt loop rate | speedup |\n"
          "|---|---|---|---|---|---|")


def make_rewards(n_prompts: int, n_responses: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian rewards with a different mean and scale per prompt, like reward-model outputs."""
    rng = np.random.default_rng(seed)
    loc = rng.normal(0.0, 2.0, size=n_prompts).repeat(n_responses)
    scale = rng.uniform(0.2, 3.0, size=n_prompts).repeat(n_responses)
    rewards = rng.normal(size=n_prompts * n_responses) * scale + loc
    return rewards, np.arange(n_prompts + 1, dtype=np.int64) * n_responses


def measure(prompts: int = 1_000_000, responses: int = 32, loop_prompts: int = 20_000,
            repeats: int = 3, strategy: str = DEFAULT_STRATEGY, seed: int = 0) -> dict:
    rewards, offsets = make_rewards(prompts, responses, seed)
    loop_prompts = min(loop_prompts, prompts)
    vec_times, loop_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        sel = select_pairs(rewards, offsets, strategy, seed=seed)
        vec_times.append(time.perf_counter() - start)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        looped = [select_pair(rewards[offsets[i]:offsets[i + 1]], strategy, rng)
                  for i in range(loop_prompts)]
        loop_times.append(time.perf_counter() - start)
    head = slice(0, loop_prompts)
    expected = [(int(c), int(r)) if ok else None
                for c, r, ok in zip(sel.chosen[head], sel.rejected[head], sel.valid[head])]
    if looped != expected:
        raise AssertionError("select_pairs disagrees with the select_pair loop")
    vec_s, loop_s = statistics.median(vec_times), statistics.median(loop_times)
    vec_rate, loop_rate = prompts / vec_s, loop_prompts / loop_s
    speedup = vec_rate / loop_rate
    row = (f"| pairs.select_pairs ({strategy}) | {prompts:,} prompts x {responses} | "
           f"{vec_s:.2f} s | {vec_rate:,.0f} prompts/s | "
           f"{loop_rate:,.0f} prompts/s ({loop_prompts:,} prompts) | {speedup:.0f}x |")
    print(HEADER)
    print(row)
    at_target_size = prompts == 1_000_000 and responses == 32
    meets = speedup >= TARGET_SPEEDUP and (not at_target_size or vec_s < TARGET_SECONDS)
    print(f"targets: speedup >= {TARGET_SPEEDUP:.0f}x"
          + (f", 1M x 32 under {TARGET_SECONDS:.0f} s" if at_target_size else "")
          + f": {'met' if meets else 'NOT met'}")
    return {
        "name": "pairs.select_pairs", "strategy": strategy, "prompts": prompts,
        "responses": responses, "repeats": repeats, "loop_prompts": loop_prompts,
        "select_pairs_s": vec_s, "select_pairs_prompts_per_s": vec_rate,
        "loop_prompts_per_s": loop_rate, "speedup": speedup,
        "select_pairs_runs_s": vec_times, "loop_runs_s": loop_times,
        "pairs_valid": int(sel.valid.sum()), "meets_targets": meets, "markdown_row": row,
    }


def run(size: str) -> list[dict]:
    """The bench harness row (bench.run_all): the same 1M x 32 workload at every size (NumPy, host)."""
    from bench.common import make_row

    r = measure()
    note = (f"{r['prompts']:,} prompts x {r['responses']} responses, strategy {r['strategy']}; loop timed on "
            f"the first {r['loop_prompts']:,} prompts (results checked equal); {r['repeats']} alternating "
            f"repetitions, median; whole selection {r['select_pairs_s']:.2f} s (target < {TARGET_SECONDS:.0f} s: "
            f"{'met' if r['select_pairs_s'] < TARGET_SECONDS else 'MISSED'}).")
    return [make_row("pair construction: select_pairs vs per-prompt loop", r["select_pairs_prompts_per_s"],
                     r["loop_prompts_per_s"], "prompts/s", "python -m bench.bench_pairs", note=note,
                     target=TARGET_SPEEDUP)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--responses", type=int, default=32)
    parser.add_argument("--loop-prompts", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return measure(args.prompts, args.responses, args.loop_prompts, args.repeats, args.strategy,
                   args.seed)


if __name__ == "__main__":
    main()
