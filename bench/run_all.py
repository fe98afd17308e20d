"""Run every benchmark and write docs/benchmarks.md.

    python -m bench.run_all [--size cpu|gpu] [--only dpo,sampling] [--out FILE] [--peer-python PATH]

A benchmark is a module bench/bench_<name>.py exposing `run(size) -> list[dict]` (rows made by
bench.common.make_row) and optionally a TITLE. The known ones run in a fixed order; an expected
module that is missing, or one that fails, gets a note in the report instead of rows, so one
broken benchmark does not hide the others (the exit status is then 1). `--size cpu` (the
default) fits a 2-core machine in about 15 minutes; `--size gpu` is for a GPU/TPU host.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import PEER_PYTHON_ENV, REPO, SIZES, machine_description, render_report

ORDER = ("dpo", "sampling", "gradients", "pairs", "packing", "logps", "mfu", "arms")
DEFAULT_OUT = REPO / "docs" / "benchmarks.md"

PREAMBLE = """
# Benchmarks

Each row is measured side by side in one run: ours and the peer are set up first (models built,
code compiled, warm-up done), then timed in alternating blocks (ABBA order) so machine load hits
both alike; each figure is the median over the blocks. `ratio` is how many times better ours is:
ours / peer for rates, peer / ours where lower is better (memory). Peers that are other libraries
(PyTorch, transformers, TRL, PEFT) run in their own virtual environment and process, created by
the benchmark (`bench/.peer-venv`, CPU torch). The `command` column reproduces a row alone;
`make bench` (= `python -m bench.run_all`) reproduces the whole page.
"""


def discover() -> list[str]:
    """Known benchmarks in ORDER, then any other bench/bench_*.py."""
    present = sorted(p.stem[len("bench_"):] for p in (REPO / "bench").glob("bench_*.py"))
    return list(ORDER) + [name for name in present if name not in ORDER]


def run_one(name: str, size: str) -> tuple[str, list[dict], str, bool]:
    """(title, rows, notes, ok) of one benchmark."""
    path = REPO / "bench" / f"bench_{name}.py"
    if not path.exists():
        return name, [], f"Not run: {path.relative_to(REPO)} is not in this checkout.", True
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.bench_{name}")
        title = getattr(module, "TITLE", name)
        rows = module.run(size)
    except Exception:
        trace = traceback.format_exc()
        print(trace, file=sys.stderr)
        last = trace.strip().splitlines()[-1]
        return name, [], f"FAILED: `{last}` (the full traceback went to stderr).", False
    elapsed = time.perf_counter() - start
    print(f"[bench] {name}: {elapsed:.0f} s", file=sys.stderr)
    return title, rows, f"Wall time of this benchmark: {elapsed:.0f} s.", True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu", choices=SIZES)
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--out", default=None, help=f"report path (default {DEFAULT_OUT.relative_to(REPO)} "
                                                    "for a full run; none with --only)")
    parser.add_argument("--peer-python", default=None,
                        help=f"interpreter of an existing peer environment (also ${PEER_PYTHON_ENV})")
    args = parser.parse_args(argv)
    if args.peer_python:
        os.environ[PEER_PYTHON_ENV] = args.peer_python
    names = [n.strip() for n in args.only.split(",") if n.strip()] or discover()
    machine = machine_description()  # before the load we add ourselves
    start = time.perf_counter()
    sections, ok = [], True
    for name in names:
        print(f"[bench] running {name} (size {args.size})", file=sys.stderr)
        title, rows, notes, good = run_one(name, args.size)
        sections.append((title, rows, notes))
        ok &= good
    machine["total wall time"] = f"{time.perf_counter() - start:.0f} s"
    command = "python -m bench.run_all" + (f" --size {args.size}" if args.size != "cpu" else "")
    if args.only:
        command += f" --only {args.only}"
    report = render_report(sections, machine, PREAMBLE, command)
    out = args.out or (None if args.only else DEFAULT_OUT)
    if out:
        from bpo_jax.io_utils import atomic_open

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out) as f:
            f.write(report)
        print(f"[bench] wrote {out}", file=sys.stderr)
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
