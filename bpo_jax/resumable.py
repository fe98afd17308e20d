"""Resumable JSONL output for stages that turn input records into output records chunk by chunk.

Every finished chunk is written whole and atomically as its own file in a hidden parts directory
beside the output (``.NAME.parts/PPP-000000.jsonl``, ..., PPP the writing process). `finalize` joins the existing output (if
any) and the parts into the output file, atomically, and removes the parts. A kill at any moment
therefore leaves only whole records, and a rerun skips every id already present in the output or
the parts; joining keeps the first record of each id, so a kill between writing the output and
removing the parts cannot duplicate anything either.

The parts directory remembers the settings that shape the records (e.g. sampling temperature);
resuming with different ones is refused instead of silently mixing two runs in one file.
Multi-host: each process writes the chunks of its own share of the input (bpo_jax.distributed)
into its own part files; `finalize` waits for all of them, and process 0 joins the parts in the
input's order, so the output does not depend on how many processes wrote it. All processes read
(the run directory must be on a shared filesystem).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax

from bpo_jax.distributed import barrier
from bpo_jax.io_utils import atomic_open, write_json, write_jsonl, writes_run_files

SETTINGS_FILE = "settings.json"


class ResumeError(ValueError):
    """Partial output that cannot be continued (other settings, unreadable records)."""


class ResumableJsonl:
    """The output of one stage: ids done so far, chunk appends, final join."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.parts = self.path.with_name(f".{self.path.name}.parts")
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from disk
        self._prefix = f"{jax.process_index():03d}-"

    def done_ids(self) -> set[str]:
        """Ids already written by earlier (possibly interrupted) runs."""
        saved = self.parts / SETTINGS_FILE
        if saved.exists():
            before = json.loads(saved.read_text(encoding="utf-8"))
            changed = sorted(k for k in before.keys() | self.settings.keys() if before.get(k) != self.settings.get(k))
            if changed:
                details = ", ".join(f"{k}: {before.get(k)!r} -> {self.settings.get(k)!r}" for k in changed)
                raise ResumeError(
                    f"{self.parts}: partial output of a run with other settings ({details}); "
                    "restore them to resume, or delete this directory to start over"
                )
        return {rid for rid, _ in self._records()}

    def write_chunk(self, records: Iterable[dict[str, Any]]) -> None:
        """Add one chunk of records (each with an 'id'), all or nothing."""
        records = list(records)
        if not records:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        if not (self.parts / SETTINGS_FILE).exists():
            write_json(self.parts / SETTINGS_FILE, self.settings)  # process 0's
        index = len(list(self.parts.glob(f"{self._prefix}*.jsonl")))
        write_jsonl(self.parts / f"{self._prefix}{index:06d}.jsonl", records, every_process=True)

    def finalize(self, order: Sequence[str] | None = None) -> None:
        """Join output and parts into the output file (first record of each id wins), in the order
        of the ids in `order` (default: as written); drop the parts. Collective in multi-host runs."""
        barrier(f"{self.path} parts written")
        if writes_run_files() and self.parts.exists():
            rank = {rid: i for i, rid in enumerate(order or ())}
            lines: dict[str, str] = {}
            for rid, line in self._records():
                lines.setdefault(rid, line)
            ranked = sorted(lines, key=lambda rid: rank.get(rid, len(rank))) if order is not None else list(lines)
            with atomic_open(self.path) as f:
                f.writelines(lines[rid] for rid in ranked)
            shutil.rmtree(self.parts)
        barrier(f"{self.path} joined")

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("[0-9]*.jsonl")) if self.parts.exists() else []

    def _records(self) -> Iterator[tuple[str, str]]:
        """(id, raw line) of every record in the output, then in the parts, in order."""
        files = ([self.path] if self.path.exists() else []) + self._part_files()
        for file in files:
            with open(file, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rid = json.loads(line)["id"]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ResumeError(f"{file}:{lineno}: field 'id': unreadable output record ({e})") from None
                    yield str(rid), line if line.endswith("\n") else line + "\n"


def check_unique_ids(ids: Iterable[str], where: str) -> None:
    """Resuming skips by id, so an input's ids must be unique."""
    first: dict[str, int] = {}
    for row, rid in enumerate(ids, 1):
        if rid in first:
            raise ResumeError(f"{where}: record {row}: field 'id': duplicate id {rid!r} (first in record {first[rid]})")
        first[rid] = row
