"""A study's summary (per-arm estimates, paired differences, claim verdicts), its markdown report
and plots, and docs/experiments.md assembled from several studies.

    python -m bpo_jax.studies.report docs/experiments.md runs/studies/A runs/studies/B ...
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bpo_jax.io_utils import atomic_open, pyplot, save_figure, write_json
from bpo_jax.pairs import POINTS
from bpo_jax.studies.spec import Study, run_stem
from bpo_jax.studies.stats import contrast_cells, estimate, verdict


def _cells(study: Study, rows: Sequence[dict], what: str) -> dict[str, np.ndarray]:
    """arm name -> [seeds, prompts]: per-prompt means of `what` (rewards or wins), seeds in study order."""
    by_arm: dict[str, dict[int, np.ndarray]] = {}
    for row in rows:
        stem = study.run_dir / "runs" / run_stem(row["arm"], row["seed"])
        by_arm.setdefault(row["arm"], {})[row["seed"]] = np.load(stem.with_suffix(".npz"))[what].mean(axis=1)
    return {arm: np.stack([seeds[s] for s in study.seeds]) for arm, seeds in by_arm.items()}


def _fmt(e: dict | None, digits: int = 4) -> str:
    if e is None:
        return "-"
    return f"{e['mean']:.{digits}f} [{e['low']:.{digits}f}, {e['high']:.{digits}f}]"


def summarize(study: Study, rows: Sequence[dict], reference: np.ndarray, timing: dict) -> dict[str, Any]:
    """Per-arm estimates with 95% CIs, paired differences to each arm's baseline, claim verdicts."""
    rewards, wins = _cells(study, rows, "rewards"), _cells(study, rows, "wins")
    n = study.bootstrap

    def est(cells: np.ndarray) -> dict:
        return estimate(cells, n).to_dict()

    arms = []
    for arm in study.arms:
        mine = [r for r in rows if r["arm"] == arm.name]
        base = study.baselines[arm.name]
        arms.append({
            "arm": arm.name, "settings": arm.settings, "baseline": base, "seeds": len(mine),
            "pairs": float(np.mean([r["data"]["pairs"] for r in mine])),
            "prompts": float(np.mean([r["data"]["prompts"] for r in mine])),
            "scored_prompts": mine[0]["data"]["scored_prompts"],
            "epochs": float(np.mean([r["epochs"] for r in mine])),
            "dropped": mine[0]["data"]["pairs_stage_skipped"],
            "mean_reward": est(rewards[arm.name]), "win_rate": est(wins[arm.name]),
            "vs_baseline": None if base in (None, arm.name) else est(rewards[arm.name] - rewards[base]),
        })
    claims = []
    for claim in study.claims:
        cells = contrast_cells([(w, [rewards[a] for a in names]) for w, names in claim.terms])
        e = estimate(cells, n)
        claims.append({"claim": claim.claim, "paper": claim.paper, "estimate": e.to_dict(), "verdict": verdict(e),
                       "terms": [[w, list(names)] for w, names in claim.terms]})
    return {
        "study": study.name, "description": study.description, "file": str(study.path),
        "command": f"python -m bpo_jax.main study --config {study.path}",
        "seeds": list(study.seeds), "bootstrap": n, "eval_prompts": int(reference.shape[0]),
        "eval_samples": int(reference.shape[1]), "reference_mean_reward": float(reference.mean()),
        "arms": arms, "claims": claims, "timing": timing,
    }


# -- plots ------------------------------------------------------------------------------------------
def plot_arms(summary: dict, path: Path) -> None:
    """Every arm's mean held-out reward with its 95% CI (and the reference's mean)."""
    plt = pyplot()
    arms = summary["arms"]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(arms) + 1.4))
    y = np.arange(len(arms))[::-1]
    means = np.array([a["mean_reward"]["mean"] for a in arms])
    err = np.array([[a["mean_reward"]["mean"] - a["mean_reward"]["low"], a["mean_reward"]["high"] - a["mean_reward"]["mean"]] for a in arms]).T
    ax.barh(y, means, xerr=err, color="tab:blue", alpha=0.7, capsize=2)
    ax.axvline(summary["reference_mean_reward"], color="gray", ls="--", label="reference (SFT)")
    ax.set_yticks(y, [a["arm"] for a in arms], fontsize=7)
    lo = min(means.min(), summary["reference_mean_reward"])
    ax.set_xlim(max(0.0, lo - 0.05), None)
    ax.set_xlabel(f"mean held-out reward (95% CI, {len(summary['seeds'])} seeds)")
    ax.legend(fontsize=7)
    ax.set_title(summary["study"], fontsize=9)
    save_figure(fig, path)


def plot_scaling(summary: dict, path: Path) -> bool:
    """Mean reward vs sample.n, one line (with its CI band) per setting of the other keys."""
    arms = [a for a in summary["arms"] if "sample.n" in a["settings"]]
    if len({a["settings"]["sample.n"] for a in arms}) < 2:
        return False
    plt = pyplot()
    lines: dict[str, list] = {}
    for a in arms:
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in a["settings"].items() if k != "sample.n") or "arm"
        lines.setdefault(label, []).append(a)
    paired = any(a["vs_baseline"] is not None for a in arms)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 4), squeeze=False)
    for label, members in lines.items():
        members.sort(key=lambda a: a["settings"]["sample.n"])
        x = [a["settings"]["sample.n"] for a in members]
        panels = [("mean_reward", axes[0, 0])] + ([("vs_baseline", axes[0, 1])] if paired else [])
        for key, ax in panels:
            zero = {"mean": 0.0, "low": 0.0, "high": 0.0}  # the baseline arm against itself
            values = [a[key] or zero for a in members]
            ax.plot(x, [v["mean"] for v in values], marker="o", label=label)
            ax.fill_between(x, [v["low"] for v in values], [v["high"] for v in values], alpha=0.15)
    axes[0, 0].axhline(summary["reference_mean_reward"], color="gray", ls="--", label="reference (SFT)")
    axes[0, 0].set_ylabel("mean held-out reward (95% CI)")
    if paired:
        axes[0, 1].axhline(0.0, color="gray", lw=0.8)
        axes[0, 1].set_ylabel("paired difference to the baseline arm (95% CI)")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("responses sampled per prompt (n)")
        ax.legend(fontsize=7)
    fig.suptitle(summary["study"], fontsize=9)
    save_figure(fig, path)
    return True


def plot_pairings(summary: dict, path: Path) -> bool:
    """7x7 heatmap of mean reward by (chosen point, rejected point) for 'a/b' pair strategies;
    drawn when at least 3 pairings are arms and no pairing is repeated (other keys varying)."""
    cells, repeated = {}, False
    for a in summary["arms"]:
        chosen, _, rejected = str(a["settings"].get("pairs.strategy", "")).partition("/")
        if chosen in POINTS and rejected in POINTS:
            key = (POINTS.index(chosen), POINTS.index(rejected))
            repeated |= key in cells
            cells[key] = a["mean_reward"]["mean"]
    if len(cells) < 3 or repeated:
        return False
    plt = pyplot()
    grid = np.full((len(POINTS), len(POINTS)), np.nan)
    for (i, j), v in cells.items():
        grid[i, j] = v
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(grid, cmap="viridis")
    middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
    for (i, j), v in cells.items():
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color="k" if v > middle else "w")
    ax.set_xticks(range(len(POINTS)), POINTS, rotation=45)
    ax.set_yticks(range(len(POINTS)), POINTS)
    ax.set_xlabel("rejected point")
    ax.set_ylabel("chosen point")
    fig.colorbar(im, ax=ax, label="mean held-out reward")
    ax.set_title(summary["study"], fontsize=9)
    save_figure(fig, path)
    return True


# -- markdown -----------------------------------------------------------------------------------------
def markdown(summary: dict, image_dir: str = ".") -> str:
    t = summary["timing"]
    env = t.get("environment", {})
    jax_version = env.get("packages", {}).get("jax")
    lines = [
        f"## {summary['study']}", "", summary["description"], "",
        f"Command: `{summary['command']}`  ",
        f"Wall time: {t['wall_seconds'] / 60:.1f} min, CPU time {t.get('cpu_seconds', 0) / 60:.1f} min "
        f"({len(t['invocations'])} invocation(s)) on {env.get('cpu')} ({env.get('cpu_count')} cores), jax {jax_version}.  ",
        f"Held-out: {summary['eval_prompts']} prompts x {summary['eval_samples']} samples, the same prompts and sampling "
        f"keys for every arm; reference (starting policy) mean reward {summary['reference_mean_reward']:.4f}. "
        f"{len(summary['seeds'])} training seeds per arm; 95% CIs from a {summary['bootstrap']}-replicate paired "
        "bootstrap over seeds and prompts.", "",
        "| arm | pairs | prompts | epochs | mean reward [95% CI] | win rate vs reference | vs baseline [95% CI] |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for a in summary["arms"]:
        base = "(baseline)" if a["baseline"] == a["arm"] else _fmt(a["vs_baseline"])
        lines.append(f"| {a['arm']} | {a['pairs']:.0f} | {a['prompts']:.0f} | {a['epochs']:.1f} | {_fmt(a['mean_reward'])} "
                     f"| {_fmt(a['win_rate'], 3)} | {base} |")
    if summary["claims"]:
        lines += ["", "| claim | paper | estimate [95% CI] | verdict |", "|---|---|---|---|"]
        for c in summary["claims"]:
            lines.append(f"| {c['claim']} | {c['paper']} | {_fmt(c['estimate'])} | **{c['verdict']}** |")
    dropped = {a["arm"]: a["dropped"] for a in summary["arms"] if any(a["dropped"].values())}
    if dropped:
        lines += ["", "Prompts without a pair (pairs stage, per reason): " + "; ".join(
            f"{arm}: " + ", ".join(f"{k} {v}" for k, v in d.items() if v) for arm, d in dropped.items())]
    lines += [""] + [f"![{name}]({image_dir}/{name})" for name in summary.get("plots", [])] + [""]
    return "\n".join(lines)


def write_outputs(study: Study, summary: dict) -> None:
    """summary.json, report.md and the plots, in the study directory."""
    out = study.run_dir
    prefix = study.name
    plots = []
    plot_arms(summary, out / f"{prefix}_arms.png")
    plots.append(f"{prefix}_arms.png")
    if plot_scaling(summary, out / f"{prefix}_scaling.png"):
        plots.append(f"{prefix}_scaling.png")
    if plot_pairings(summary, out / f"{prefix}_pairings.png"):
        plots.append(f"{prefix}_pairings.png")
    summary["plots"] = plots
    write_json(out / "summary.json", summary)
    with atomic_open(out / "report.md") as f:
        f.write(markdown(summary))
    print(markdown(summary), flush=True)


def write_experiments(out: str | Path, study_dirs: Sequence[str | Path], preamble: str = "") -> None:
    """docs/experiments.md from finished studies: their reports, plots copied beside it."""
    out = Path(out)
    images = out.parent / out.stem
    images.mkdir(parents=True, exist_ok=True)
    parts = [preamble.strip(), ""] if preamble.strip() else []
    for directory in map(Path, study_dirs):
        summary = json.loads((directory / "summary.json").read_text())
        for name in summary.get("plots", []):
            shutil.copyfile(directory / name, images / name)
        parts.append(markdown(summary, image_dir=images.name))
    with atomic_open(out) as f:
        f.write("\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Assemble docs/experiments.md from finished studies.")
    parser.add_argument("out")
    parser.add_argument("studies", nargs="+", help="study run directories (each with summary.json)")
    parser.add_argument("--preamble", help="a markdown file to put first")
    args = parser.parse_args(argv)
    write_experiments(args.out, args.studies, Path(args.preamble).read_text() if args.preamble else "")


if __name__ == "__main__":
    main()
