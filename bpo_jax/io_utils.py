"""Atomic file output: every file bpo_jax writes appears whole or not at all.

A stage killed mid-write must never leave a half-written JSONL/JSON/PNG behind that a rerun would
mistake for finished output, so writers go to a temp file in the same directory and rename.

In a multi-host run every process runs the same stage code, but a run file is written once, by
process 0: the other processes' writes go nowhere. Files that are each process's own (partial
chunks, feature shards, named by process) pass `every_process=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", encoding: str | None = "utf-8", *, every_process: bool = False
) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it onto `path`.

    Multi-host: only process 0 writes (the others get a sink) unless `every_process`."""
    if not every_process and not writes_run_files():
        with open(os.devnull, mode, encoding=None if "b" in mode else encoding) as sink:
            yield sink
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def writes_run_files() -> bool:
    """True unless this is a process other than 0 of a multi-host (jax.distributed) run."""
    jax = sys.modules.get("jax")  # never imported here: a run without JAX is single-process
    return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_beside(path: str | Path) -> Path:
    """A fresh hidden directory beside `path` with ordinary (umask) permissions, to be renamed onto it.

    mkdtemp makes 0700 directories: a model written that way would be unreadable to other users
    and to a serving process on a shared disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    ordinary_permissions(tmp)
    return tmp


def ordinary_permissions(path: str | Path) -> None:
    """Give a file 0666, a directory 0777, less the umask (some writers, e.g. safetensors, make 0600)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def fsync_path(path: str | Path) -> None:
    """Flush a written file (or a directory's entries, after a rename) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def write_jsonl(path: str | Path, records: Iterable[dict], *, every_process: bool = False) -> int:
    """Write records one JSON object per line, atomically; returns the number written."""
    n = 0
    with atomic_open(path, every_process=every_process) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, default=_json_default))
            f.write("\n")
            n += 1
    return n


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = pyplot()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def _json_default(obj: Any) -> Any:
    """Let NumPy / JAX scalars and arrays pass through json.dump."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
