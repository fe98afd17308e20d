"""Read records from JSONL (optionally gzipped) and Parquet files, streaming, with clear row errors.

`read_records(path, kind)` dispatches on the file suffix and returns (records, report). A bad row
raises `DataError` naming file:line and field; with `skip_bad_rows=True` the row is skipped and
counted by reason in the `ReadReport` instead (the first few messages are kept for the log).

Every reader also takes a prepared TFDS dataset wherever it takes a file (`is_tfds_reference`):
`tfds:NAME[/CONFIG][:VERSION]` (a registered name, found under $TFDS_DATA_DIR), `tfds:DIR` or a
local dataset directory (one holding dataset_info.json, or a dataset/config directory with a single
prepared version below it), each optionally followed by `[SPLIT]` (default train). Its rows go
through the same validation, with `REFERENCE[SPLIT]:row N` as their location.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from bpo_jax.data.schema import DataError, Kind, PreferencePair, Record, infer_kind, parse_record
from bpo_jax.io_utils import write_jsonl

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
TFDS_PREFIX = "tfds:"
_SPLIT_SUFFIX = re.compile(r"^(.*?)\[(.+)\]$")
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
    """Normalize raw rows from any source, raising or counting bad ones (shared by all readers).

    Besides each row's own fields: ids must be unique (resuming and joining go by id), and a pair's
    chosen must differ from its rejected (such a pair has no preference to learn).
    """
    first_seen: dict[str, str] = {}
    for where, index, row in rows:
        report.n_rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            if kind == "auto" and isinstance(row, dict):
                kind = infer_kind(row)
            record = parse_record(row, kind, index, where)
            if record.id in first_seen:
                raise DataError(where, "id", "duplicate_id", f"duplicate id {record.id!r} (first at {first_seen[record.id]})")
            if isinstance(record, PreferencePair) and record.chosen == record.rejected:
                raise DataError(where, "rejected", "same_as_chosen", "chosen and rejected are identical: no preference")
            first_seen[record.id] = where
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
    """Decoded rows of a JSONL or Parquet file (chosen by suffix), or of a TFDS dataset split."""
    if is_tfds_reference(path):
        from bpo_jax.data.tfds_builder import tfds_rows  # imports tensorflow_datasets: only when used

        return tfds_rows(str(path))
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), None, "bad_file", "a directory, neither a data file nor a prepared TFDS dataset "
                        "(no dataset_info.json in it or up to two levels below)")
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


def split_tfds_reference(reference: str | Path) -> tuple[str, str]:
    """(registered name or dataset directory, split) of a TFDS reference; the split defaults to train."""
    text = str(reference)
    text = text[len(TFDS_PREFIX):] if text.startswith(TFDS_PREFIX) else text
    match = _SPLIT_SUFFIX.match(text)
    target, split = (match.group(1), match.group(2)) if match else (text, "train")
    # Path() collapses "gs://b/x" to "gs:/b/x" when a caller wrapped the reference in one.
    return re.sub(r"^([a-z][a-z0-9+.-]*):/(?!/)", r"\1://", target), split


def tfds_version_dirs(directory: Path) -> list[Path]:
    """Prepared dataset versions at or up to two levels below `directory` (dataset_info.json)."""
    if (directory / "dataset_info.json").is_file():
        return [directory]
    found = list(directory.glob("*/dataset_info.json")) + list(directory.glob("*/*/dataset_info.json"))
    return sorted(p.parent for p in found)


def is_tfds_reference(path: str | Path) -> bool:
    """True for `tfds:...` and for a local directory holding a prepared TFDS dataset."""
    if str(path).startswith(TFDS_PREFIX):
        return True
    directory = Path(split_tfds_reference(path)[0])
    return directory.is_dir() and bool(tfds_version_dirs(directory))


def read_demonstrations(path: str | Path) -> list[PreferencePair]:
    """SFT demonstrations {prompt, response} as pairs with chosen = rejected = the response.

    The DPO batch format then carries them unchanged through tokenization and batching.
    """
    pairs = []
    for where, index, row in raw_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict) or "response" not in row:
            raise DataError(where, "response", "missing_field", "a demonstration needs 'prompt' and 'response'")
        pairs.append(parse_record({**row, "chosen": row["response"], "rejected": row["response"]}, "pairs", index, where))
    return pairs


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
        value = json.loads(text.lstrip("\ufeff"), object_pairs_hook=_unique_keys)
        if _SURROGATE_ESCAPE.search(text):  # rare: only then pay for the full check
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        return where, index, value
    except UnicodeEncodeError:
        return where, index, DataError(where, None, "not_text", "a lone UTF-16 surrogate escape (\\ud800-\\udfff): not text")
    except json.JSONDecodeError as e:
        return where, index, DataError(where, None, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
    except _DuplicateKey as e:
        return where, index, DataError(where, str(e), "duplicate_key", "key appears twice in one object")
    except (ValueError, RecursionError) as e:  # an integer over Python's digit limit; absurdly deep nesting
        problem = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        return where, index, DataError(where, None, "invalid_json", f"unreadable JSON: {problem}")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key is an error (json.loads would silently keep the last value)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


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
