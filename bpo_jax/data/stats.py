"""Knowledge breadth and depth of a data file (BPO's view of a preference dataset).

Breadth B = number of unique prompts (compared by `prompt_key`, so equal conversations match).
Depth K per prompt = pairs per prompt for a pairs file, responses per prompt for scored groups,
rows per prompt for a prompts file. A pairs file also reports responses per prompt (distinct
chosen/rejected texts). A typical DPO set is (B, K) = (n, 1) pairs, i.e. 2 responses per prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bpo_jax.data.readers import read_records
from bpo_jax.data.schema import DataError, prompt_key
from bpo_jax.io_utils import pyplot, save_figure, write_json

_DEPTH_UNIT = {"pairs": "pairs per prompt", "scored": "responses per prompt", "prompts": "rows per prompt"}


def dataset_stats(path: str | Path, skip_bad_rows: bool = False) -> dict[str, Any]:
    """Breadth, depth summary and depth histogram {K: number of prompts} of any record file."""
    records, report = read_records(path, "auto", skip_bad_rows=skip_bad_rows)
    if not records:
        raise DataError(str(path), None, "empty", "no records to compute statistics on")
    index: dict[str, int] = {}
    group = np.fromiter((index.setdefault(prompt_key(r.prompt), len(index)) for r in records), np.int64, len(records))
    kind = report.kind
    if kind == "scored":
        depth = np.bincount(group, weights=[len(r.responses) for r in records]).astype(np.int64)
    else:
        depth = np.bincount(group)
    stats: dict[str, Any] = {
        "path": str(path),
        "kind": kind,
        "n_records": len(records),
        "n_skipped": report.n_skipped,
        "breadth": len(index),
        "depth": _summary(depth, _DEPTH_UNIT[kind]),
        "depth_histogram": _histogram(depth),
    }
    if kind == "pairs":
        responses = {(g, prompt_key(text)) for g, r in zip(group.tolist(), records) for text in (r.chosen, r.rejected)}
        per_prompt = np.bincount(np.fromiter((g for g, _ in responses), np.int64, len(responses)), minlength=len(index))
        stats["responses_per_prompt"] = _summary(per_prompt, "distinct responses per prompt")
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text table of `dataset_stats` output."""
    lines = [
        f"data          {stats['path']} ({stats['kind']}, {stats['n_records']} records, {stats['n_skipped']} skipped)",
        f"breadth B     {stats['breadth']} unique prompts",
        _summary_line("depth K", stats["depth"]),
    ]
    if "responses_per_prompt" in stats:
        lines.append(_summary_line("responses", stats["responses_per_prompt"]))
    lines.append(f"{'K':>6}  prompts")
    lines += [f"{k:>6}  {n}" for k, n in stats["depth_histogram"].items()]
    return "\n".join(lines)


def write_stats(path: str | Path, out_dir: str | Path) -> str:
    """Print and return the table; write <stem>.stats.json and a <stem>.depth.png histogram."""
    stats = dataset_stats(path)
    out_dir = Path(out_dir)
    stem = Path(path).name.split(".")[0]
    write_json(out_dir / f"{stem}.stats.json", stats)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    hist = stats["depth_histogram"]
    ax.bar([str(k) for k in hist], list(hist.values()), color="#4c72b0")
    ax.set_xlabel(f"K ({stats['depth']['unit']})")
    ax.set_ylabel("prompts")
    ax.set_title(f"{Path(path).name}: B = {stats['breadth']}, mean K = {stats['depth']['mean']:.2f}")
    save_figure(fig, out_dir / f"{stem}.depth.png")
    text = format_stats(stats)
    print(text)
    return text


def _summary(values: np.ndarray, unit: str) -> dict[str, Any]:
    return {
        "unit": unit,
        "total": int(values.sum()),
        "mean": float(values.mean()),
        "min": int(values.min()),
        "median": float(np.median(values)),
        "max": int(values.max()),
    }


def _histogram(values: np.ndarray) -> dict[int, int]:
    ks, counts = np.unique(values, return_counts=True)
    return {int(k): int(c) for k, c in zip(ks, counts)}


def _summary_line(label: str, s: dict[str, Any]) -> str:
    return (
        f"{label:<13} mean {s['mean']:.2f}  min {s['min']}  median {s['median']:g}  max {s['max']}  "
        f"({s['unit']}, total {s['total']})"
    )
