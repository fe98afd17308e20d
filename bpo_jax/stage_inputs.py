"""What a single stage reads from earlier stages, checked before it starts.

`python -m bpo_jax.main --config X train` on a run directory where the pairs (or the SFT model)
do not exist yet stops with one line naming the missing file and the stage that writes it, instead
of a traceback from deep inside the stage. A stage counts as finished when its done marker exists
(the file it writes last); entering later through data.scored / data.pairs skips the stages
those files replace, as the pipeline itself does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from bpo_jax.data.schema import DataError

if TYPE_CHECKING:  # pipeline imports this module
    from bpo_jax.pipeline import Run


def needed_outputs(run: Run, stage: str) -> list[tuple[str, Path, Path]]:
    """(producing stage, file the stage reads, that stage's done marker) for each earlier output `stage` needs."""
    c, d = run.config, run.config.data
    needs: list[tuple[str, Path, Path]] = []
    starts_later = bool(d.scored or d.pairs)
    bpo_runs = not d.pairs and (c.bpo.depth_allocator != "off" or c.bpo.pairs_per_prompt > 0)
    scored = [] if d.scored else [("score", run.scored, run.scored)]
    if stage == "score" and not starts_later:
        needs.append(("sample", run.responses, run.responses))
    elif stage == "pairs" and not d.pairs:
        needs += scored
    elif stage == "bpo" and bpo_runs:
        needs += scored
    elif stage == "train" and not d.pairs:
        if bpo_runs:  # train reads the BPO allocation (or balancing), never the pairs stage's file in its place
            needs.append(("bpo", run.train_pairs, run.root / "bpo" / "bpo_report.json"))
        else:
            needs.append(("pairs", run.pairs, run.pairs_dir / "pairs_report.json"))
    elif stage == "eval":
        needs.append(("train", run.policy, run.policy / "config.json"))
    uses_reference = {
        "sample": not starts_later,
        "bpo": not d.pairs and c.bpo.depth_allocator == "gradient",
        "train": True,
        "eval": True,
    }
    if c.sft.enabled and uses_reference.get(stage, False):
        needs.append(("sft", run.sft_model, run.sft_model / "config.json"))
    return needs


def check_stage_inputs(run: Run, stage: str) -> None:
    """Raise DataError naming the first missing earlier output of `stage` and the stage that writes it."""
    for producer, path, marker in needed_outputs(run, stage):
        if not marker.exists():
            raise DataError(
                str(path), None, "missing_input",
                f"stage {stage!r} reads this output of stage {producer!r}, which has not finished here: "
                f"run stage {producer!r} first (or all stages)",
            )
