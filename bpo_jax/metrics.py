"""Training metrics: metrics.jsonl, TensorBoard events, a progress bar and a PNG of the curves.

Only process 0 writes. A resumed run first drops the lines logged after the step it resumes
from (a killed run may have logged steps its last checkpoint does not contain), so metrics.jsonl
always describes exactly one straight run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax

from bpo_jax.io_utils import atomic_open, pyplot, save_figure
from bpo_jax.resumable import ResumeError

CURVES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file; a torn last line (the run was killed mid-append) is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != lines[-1][0]:
                raise ResumeError(f"{path}:{i}: not a JSON metrics record; delete the file to start its log afresh") from None
            warnings.warn(f"{path}:{i}: dropping a torn last line (the run was killed while writing it)", stacklevel=2)
    return rows


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, start_step: int, total_steps: int, name: str = "train"):
        self.enabled = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / f"{name}_metrics.jsonl"
        self.name = name
        self.history: list[dict] = []
        self._tb = self._bar = self._file = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.history = [r for r in read_metrics(self.path) if r["step"] <= start_step]
            with atomic_open(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        # purge_step: TensorBoard drops the events a killed run logged past the resumed step. The suffix
        # keeps a resume within the same second from overwriting the first run's event file.
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard" / name), purge_step=start_step + 1 if start_step else None,
                                 filename_suffix=f".from_step_{start_step}")
        self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of optimizer step `step` (1-based: steps completed)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(f"{self.name}/{k}", float(v), step)
        self._bar.update(step - self._bar.n)
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "rewards/accuracies", "tokens_per_second") if k in metrics}
        self._bar.set_postfix(shown)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()
        self._bar.close()
        if self.history:
            self.plot(self.run_dir / f"{self.name}_curves.png")

    def plot(self, path: Path) -> None:
        plt = pyplot()
        names = [n for n in CURVES if any(n in r for r in self.history)]
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
        for ax, n in zip(axes[0], names):
            rows = [r for r in self.history if n in r]
            ax.plot([r["step"] for r in rows], [r[n] for r in rows])
            ax.set_title(n)
            ax.set_xlabel("step")
        save_figure(fig, path)
