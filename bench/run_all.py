"""Run every benchmark and write docs/benchmarks.md.

    python -m bench.run_all [--size cpu,smollm2,gpu] [--only dpo,sampling] [--out FILE] [--peer-python PATH]

A benchmark is a module bench/bench_<name>.py exposing `run(size) -> list[dict]` (rows made by
bench.common.make_row), optionally a TITLE, and the sizes it runs at (SIZES, else the keys of its
SETTINGS, else every size). The known ones run in a fixed order; an expected module that is
missing, or one that fails, gets a note in the report instead of rows, so one broken benchmark
does not hide the others (the exit status is then 1). `--size cpu` (the default) fits a 2-core
machine in about 15 minutes; `smollm2` is the shipped model's shape on CPU (hours on 2 cores);
`gpu` is for a GPU/TPU host. Several sizes run one after the other (`--size cpu,smollm2`).

The report has one section per size. Rewriting it keeps what this run did not produce: the
sections of sizes not run this time, and sections added by hand (measured by other commands,
e.g. bench/compile_cache_cli.py), after the sizes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import PEER_PYTHON_ENV, REPO, SIZES, machine_description, markdown_table, tune_this_process

ORDER = ("dpo", "sampling", "gradients", "reference", "pairs", "packing", "logps", "mfu", "arms")
SIZE_HEADING = "## Size "
SIZE_DESCRIPTIONS = {
    "cpu": "A toy that fits the 2-core CI machine (19M-parameter Llama, vocab 32000, hidden 256, 4 layers, "
           "in the DPO, sampling and MFU rows; each row's note gives its model)",
    "smollm2": "SmolLM2-135M's shape (vocab 49152, hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, "
               "tied embeddings), random weights, float32, on CPU",
    "gpu": "A larger model for a GPU/TPU host",
}
DEFAULT_OUT = REPO / "docs" / "benchmarks.md"

PREAMBLE = """
# Benchmarks

Each row is measured side by side in one run: ours and the peer are set up first (models built,
code compiled, warm-up done), then timed in alternating blocks (ABBA order) so machine load hits
both alike; each figure is the median over the blocks. `ratio` is how many times better ours is:
ours / peer for rates, peer / ours where lower is better (memory). Peers that are other libraries
(PyTorch, transformers, TRL, PEFT) run in their own virtual environment and process, created by
the benchmark (`bench/.peer-venv`, CPU torch). bpo_jax runs with the malloc settings its command
line uses (bpo_jax/host_memory.py); the peer is measured with the same settings, without them, and
with jemalloc where installed, and compared at its best. The `command` column reproduces a row alone;
each size's section names the command that produced it (`make bench` = `python -m bench.run_all`
for the cpu size; `--size cpu,smollm2` for both CPU sizes).
"""


def discover() -> list[str]:
    """Known benchmarks in ORDER, then any other bench/bench_*.py."""
    present = sorted(p.stem[len("bench_"):] for p in (REPO / "bench").glob("bench_*.py"))
    return list(ORDER) + [name for name in present if name not in ORDER]


def module_sizes(module: object) -> tuple[str, ...]:
    """The sizes a benchmark module runs at: its SIZES, else its SETTINGS' keys, else all."""
    sizes = getattr(module, "SIZES", None) or tuple(getattr(module, "SETTINGS", ()))
    return tuple(sizes) or SIZES


def run_one(name: str, size: str) -> tuple[str, list[dict], str, bool]:
    """(title, rows, notes, ok) of one benchmark."""
    path = REPO / "bench" / f"bench_{name}.py"
    if not path.exists():
        return name, [], f"Not run: {path.relative_to(REPO)} is not in this checkout.", True
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.bench_{name}")
        title = getattr(module, "TITLE", name)
        if size not in module_sizes(module):
            return title, [], f"Not run at size {size}: this benchmark runs at {', '.join(module_sizes(module))}.", True
        rows = module.run(size)
    except Exception:
        trace = traceback.format_exc()
        print(trace, file=sys.stderr)
        last = trace.strip().splitlines()[-1]
        return name, [], f"FAILED: `{last}` (the full traceback went to stderr).", False
    elapsed = time.perf_counter() - start
    print(f"[bench] {name}: {elapsed:.0f} s", file=sys.stderr)
    return title, rows, f"Wall time of this benchmark: {elapsed:.0f} s.", True


def render_size(size: str, command: str, machine: dict[str, str], sections: list[tuple[str, list[dict], str]]) -> str:
    """One size's section of the report: what produced it, the machine, then a table per benchmark."""
    parts = [f"{SIZE_HEADING}{size}", "", f"{SIZE_DESCRIPTIONS[size]}.", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')}.", "", "### Machine", ""]
    parts += [f"- {k}: {v}" for k, v in machine.items()]
    for title, rows, notes in sections:
        parts += ["", f"### {title}", ""]
        if rows:
            parts.append(markdown_table(rows))
            row_notes = [f"- {r['workload']}: {r['note']}" for r in rows if r.get("note")]
            if row_notes:
                parts += [""] + row_notes
        if notes:
            parts += ["", notes.strip()]
    return "\n".join(parts).strip() + "\n"


def split_sections(report: str) -> list[tuple[str, str]]:
    """The report's level-2 sections as (heading line, whole text), in order; the preamble is dropped."""
    sections: list[tuple[str, str]] = []
    for line in report.splitlines(keepends=True):
        if line.startswith("## "):
            sections.append((line.strip(), line))
        elif sections:
            heading, text = sections[-1]
            sections[-1] = (heading, text + line)
    return sections


def merge_report(previous: str, new_sizes: dict[str, str], generated_titles: set[str]) -> str:
    """The whole report: PREAMBLE, then a section per size (this run's `new_sizes`, else the previous
    report's), then the previous report's hand-added sections. Sections that an older layout of this
    report generated (its Machine and benchmark sections, `generated_titles`) are dropped."""
    old = split_sections(previous)
    sizes = {h[len(SIZE_HEADING):].strip(): text for h, text in old if h.startswith(SIZE_HEADING)}
    sizes.update(new_sizes)
    generated = {f"## {t}" for t in generated_titles} | {"## Machine"}
    kept = [text for h, text in old if not h.startswith(SIZE_HEADING) and h not in generated]
    body = [sizes[size].strip() for size in SIZES if size in sizes] + [text.strip() for text in kept]
    return "\n\n".join([PREAMBLE.strip()] + body) + "\n"


def known_titles() -> set[str]:
    """Titles of the benchmark modules in this checkout (the sections this runner generates)."""
    titles = set()
    for name in discover():
        if (REPO / "bench" / f"bench_{name}.py").exists():
            titles.add(getattr(importlib.import_module(f"bench.bench_{name}"), "TITLE", name))
    return titles


def parse_sizes(text: str) -> list[str]:
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise argparse.ArgumentTypeError(f"unknown size {', '.join(unknown) or repr(text)}: choose from {', '.join(SIZES)}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=["cpu"], type=parse_sizes, help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--out", default=None, help=f"report path (default {DEFAULT_OUT.relative_to(REPO)} "
                                                    "for a full run; none with --only)")
    parser.add_argument("--peer-python", default=None,
                        help=f"interpreter of an existing peer environment (also ${PEER_PYTHON_ENV})")
    args = parser.parse_args(argv)
    if args.peer_python:
        os.environ[PEER_PYTHON_ENV] = args.peer_python
    tune_this_process()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or discover()
    rendered, ok = {}, True
    for size in args.size:
        machine = machine_description()  # before the load we add ourselves
        start = time.perf_counter()
        sections = []
        for name in names:
            print(f"[bench] running {name} (size {size})", file=sys.stderr)
            title, rows, notes, good = run_one(name, size)
            sections.append((title, rows, notes))
            ok &= good
        machine["total wall time"] = f"{time.perf_counter() - start:.0f} s"
        command = f"python -m bench.run_all --size {size}" + (f" --only {args.only}" if args.only else "")
        rendered[size] = render_size(size, command, machine, sections)
    out = args.out or (None if args.only else DEFAULT_OUT)
    previous = Path(out).read_text() if out and Path(out).exists() else ""
    report = merge_report(previous, rendered, known_titles())
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
