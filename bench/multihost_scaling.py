"""Time and memory of the whole pipeline on 1, 2 and 4 processes (jax.distributed over loopback).

    python -m bench.multihost_scaling [--processes 1,2,4] [--devices 8]

Runs tests/test_multihost.py's tiny config (every stage: sft, breadth, sample, score, pairs, bpo
features, train, eval) from scratch as P processes x devices/P emulated CPU devices each, one P
after another, and prints a markdown table for docs/multihost.md: wall time, CPU time of all
processes, the largest peak RSS of one process, and the median DPO step time (steps 2..). On one
machine the processes share its cores, so this shows the overhead of the multi-controller runtime
(startup, per-process compiles, cross-process collectives), not the speed-up of real hosts.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from tests.test_multihost import events, finish, main_args, start, tiny_config


def measure(processes: int, devices: int, root: Path) -> dict:
    """One fresh run of the tiny pipeline on `processes` x devices/processes devices."""
    config = tiny_config(root)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start_time = time.perf_counter()
    finish(start(main_args(config, root / "run"), processes, devices // processes, root / "log"), root / "log")
    wall = time.perf_counter() - start_time
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    steps = [json.loads(line)["step_time"] for line in (root / "run" / "train" / "train_metrics.jsonl").read_text().splitlines()]
    return {
        "processes": processes,
        "devices": f"{processes} x {devices // processes}",
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mib": max(e["mib"] for log in events(root / "log").values() for e in log if e["event"] == "peak_rss"),
        "step_ms": 1000 * statistics.median(steps[1:]),
    }


def table(rows: list[dict]) -> str:
    lines = ["| processes x devices | wall (s) | CPU, all processes (s) | peak RSS of one process (MiB) | DPO step (ms, median) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['step_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices in all (split over the processes)")
    args = parser.parse_args()
    rows = []
    for p in (int(x) for x in args.processes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(p, args.devices, Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
