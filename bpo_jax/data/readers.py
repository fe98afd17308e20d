"""Read records from JSONL (optionally gzipped) and Parquet files, streaming, with clear row errors.

`read_records(path, kind)` dispatches on the file suffix and returns (records, report). A bad row
raises `DataError` naming file:line and field; with `skip_bad_rows=True` the row is skipped and
counted by reason in the `ReadReport` instead (the first few messages are kept for the log).
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from bpo_jax.data.schema import DataError, Kind, Record, infer_kind, parse_record
from bpo_jax.io_utils import write_jsonl

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
_MAX_EXAMPLES = 5

# (where, 0-based row number, decoded row or the error that stopped decoding it)
RawRow = tuple[str, int, Any]


@dataclass
class ReadReport:
    """What reading a file did: rows seen, records kept, rows skipped by reason."""

    path: str
    kind: str | None = None
    n_rows: int = 0
    n_records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_skipped": self.n_skipped}


def read_records(
    path: str | Path, kind: Kind | Literal["auto"], skip_bad_rows: bool = False
) -> tuple[list[Record], ReadReport]:
    """All records of a JSONL/Parquet file as `kind` ('auto': inferred from the first row)."""
    report = ReadReport(str(path))
    records = list(iter_records(path, kind, skip_bad_rows, report))
    return records, report


def iter_records(
    path: str | Path,
    kind: Kind | Literal["auto"],
    skip_bad_rows: bool = False,
    report: ReadReport | None = None,
) -> Iterator[Record]:
    """Stream records from a file; `report` (if given) is updated as rows are read."""
    return records_from_rows(raw_rows(path), kind, skip_bad_rows, report or ReadReport(str(path)))


def records_from_rows(
    rows: Iterable[RawRow], kind: Kind | Literal["auto"], skip_bad_rows: bool, report: ReadReport
) -> Iterator[Record]:
    """Normalize raw rows from any source, raising or counting bad ones (shared by all readers)."""
    for where, index, row in rows:
        report.n_rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            if kind == "auto" and isinstance(row, dict):
                kind = infer_kind(row)
            record = parse_record(row, kind, index, where)
        except DataError as e:
            if not skip_bad_rows:
                raise
            report.skipped[e.reason] = report.skipped.get(e.reason, 0) + 1
            if len(report.examples) < _MAX_EXAMPLES:
                report.examples.append(str(e))
            continue
        report.kind = kind
        report.n_records += 1
        yield record


def raw_rows(path: str | Path) -> Iterator[RawRow]:
    """Decoded rows of a JSONL or Parquet file, chosen by suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return _jsonl_rows(path)
    if name.endswith(PARQUET_SUFFIXES):
        return _parquet_rows(path)
    raise DataError(
        str(path), None, "bad_file", f"unsupported file type (expected one of {JSONL_SUFFIXES + PARQUET_SUFFIXES})"
    )


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Write records as JSONL (atomically); reading the file back gives equal records."""
    return write_jsonl(path, (r.to_dict() for r in records))


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    yield _decode_line(raw, f"{path}:{lineno}", lineno - 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(str(path), None, "bad_file", f"cannot decompress: {e}") from None


def _decode_line(raw: bytes, where: str, index: int) -> RawRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return where, index, DataError(
            where, None, "not_utf8", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        )
    try:
        return where, index, json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as e:
        return where, index, DataError(where, None, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(str(path), None, "bad_file", f"not a readable Parquet file: {e}") from None
    index = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield f"{path}:row {index}", index - 1, row
