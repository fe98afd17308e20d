"""Orbax checkpoints of the train state plus the data position, so a resumed run continues exactly.

Each checkpoint holds two items: `state` (the TrainState pytree: trainable params, optimizer
state, step, RNG; saved collectively by all processes, restored onto whatever sharding the new run
asks for) and `data` (the input iterator's JSON state: epoch and position).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointDamaged(ValueError):
    """No checkpoint in the directory reads back whole."""


class Checkpointer:
    """Save every N steps and at the end, keep the last K, restore the newest intact one."""

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, target_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto the shapes, dtypes and shardings of `target_state` (concrete or abstract).

        Without `step`: the newest checkpoint that reads back whole. Newer ones that do not (a file
        truncated or deleted, e.g. by a full disk) are reported and moved aside as STEP.damaged/,
        so training redoes those steps and can save them again.
        """
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        damaged: list[tuple[int, Exception]] = []
        for candidate in steps:
            try:
                restored = self.manager.restore(candidate, args=args)
            except Exception as e:  # orbax and tensorstore raise many types for damaged files
                damaged.append((candidate, e))
                continue
            for bad, error in damaged:
                warnings.warn(f"{self.directory / str(bad)}: checkpoint unreadable ({type(error).__name__}: "
                              f"{str(error)[:300]}); resuming from step {candidate}, the damaged one moved to "
                              f"{bad}.damaged", stacklevel=2)
                if jax.process_index() == 0:
                    os.replace(self.directory / str(bad), self.directory / f"{bad}.damaged")
            if damaged:
                self.manager.reload()
            return restored.state, dict(restored.data or {})
        bad, error = damaged[0]
        raise CheckpointDamaged(f"{self.directory / str(bad)}: no checkpoint here reads back ({error})") from error

    def wait(self) -> None:
        """Block until async saves have landed on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
