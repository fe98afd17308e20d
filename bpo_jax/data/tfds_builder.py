"""TFDS without TensorFlow: local data files as a versioned array_record dataset, and reading any.

`BpoPreferences` ("bpo_preferences") is a GeneratorBasedBuilder whose splits come from data files
(JSONL/Parquet, read with our validating readers) of one record kind: preference pairs (the
default), prompts, scored groups, or SFT demonstrations. Either a `BpoPreferencesConfig(name,
files={"train": path, ...}, kind=...)` or, with no config, every `<split>.jsonl` / `<split>.parquet`
pairs file in the manual directory. Importing this module registers it, so this works without
TensorFlow (`python -m bpo_jax.main tfds --data FILE --out DIR` does the same from the shell):

    builder = tfds.builder("bpo_preferences", data_dir=d, config=BpoPreferencesConfig("mine", files={...}))
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source("train")   # random access; tfds_rows reads it with grain

Examples keep the file order (shuffling at preparation is disabled). Conversational fields are
stored as JSON text with `conversational=True`; plain strings as they are.

`tfds_rows` reads any prepared array_record dataset (ours or someone else's, by registered name or
directory) as raw rows for the shared record validation, so every data key of a config can name one.

What needs TensorFlow and is therefore avoided here: `tfds.load(...)` / `builder.as_dataset(...)`
(tf.data pipelines), preparing or reading the default "tfrecord" file format, and the
`tfds build` CLI for datasets prepared that way. `as_data_source` / `tfds.data_source` on
array_record data do not.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import grain
import numpy as np
import tensorflow_datasets as tfds

from bpo_jax.data.readers import (
    RawRow,
    ReadReport,
    iter_records,
    raw_rows,
    read_demonstrations,
    records_from_rows,
    split_tfds_reference,
    tfds_version_dirs,
)
from bpo_jax.data.schema import KINDS, DataError, Kind, Record, infer_kind

_SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
READ_THREADS = 8  # parallel row reads in tfds_rows
DATASET_KINDS = (*KINDS, "demonstrations")  # what a bpo_preferences config can hold
# Fields that hold JSON text in rows of a conversational example (`conversational` feature true).
_CONVERSATIONAL_FIELDS = ("prompt", "chosen", "rejected", "response", "responses")


@dataclasses.dataclass(eq=False)
class BpoPreferencesConfig(tfds.core.BuilderConfig):
    """A named dataset made of data files: `files` maps split name -> path; `kind` their records."""

    files: dict[str, str] = dataclasses.field(default_factory=dict)
    kind: str = "pairs"  # pairs | prompts | scored | demonstrations


class BpoPreferences(tfds.core.GeneratorBasedBuilder):
    """Pairs {id, prompt, chosen, rejected, meta}, prompts, scored groups or demonstrations from local files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = BpoPreferencesConfig
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Without a config, put <split>.jsonl (or .parquet) pairs files in the manual dir."
    # TFDS 4.9.10 derives this via `importlib_resources`, which it only installs for Python < 3.9.
    code_path = tfds.core.Path(__file__)

    @property
    def kind(self) -> str:
        return self.builder_config.kind if self.builder_config else "pairs"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.kind} prepared by bpo_jax from local files.",
            features=tfds.features.FeaturesDict(_features(self.kind)),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        files = dict(self.builder_config.files) if self.builder_config else {}
        if not files:
            manual = Path(dl_manager.manual_dir)
            files = {
                p.name.split(".")[0]: str(p) for p in sorted(manual.iterdir()) if p.name.endswith(_SPLIT_SUFFIXES)
            }
            if not files:
                raise DataError(str(manual), None, "bad_file", f"no pairs files ({', '.join(_SPLIT_SUFFIXES)}) found")
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for i, record in enumerate(_records(path, self.kind)):
            yield i, _encode(record, self.kind)


def _records(path: str | Path, kind: str) -> Iterable[Record]:
    return read_demonstrations(path) if kind == "demonstrations" else iter_records(path, kind)


def file_kind(path: str | Path) -> str:
    """The record kind of a data file, from its first row (demonstrations: a 'response' field)."""
    for where, _, row in raw_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(where, None, "not_object", f"expected a JSON object, got {type(row).__name__}")
        return "demonstrations" if "response" in row and "chosen" not in row else infer_kind(row)
    raise DataError(str(path), None, "empty", "no rows")


def build_tfds_dataset(
    files: str | Path | Mapping[str, str | Path],
    data_dir: str | Path,
    name: str | None = None,
    split: str = "train",
    kind: str = "auto",
) -> BpoPreferences:
    """Prepare data files as bpo_preferences/<name> under `data_dir` (array_record, no TensorFlow).

    `files`: one path (split `split`) or {split: path}. `kind`: one of DATASET_KINDS, or 'auto'
    (from the first row of the first file). `name` defaults to the first file's name.
    """
    files = {split: files} if isinstance(files, (str, Path)) else dict(files)
    if not files:
        raise ValueError("build_tfds_dataset needs at least one file")
    paths = {s: str(Path(p).resolve()) for s, p in files.items()}
    first = next(iter(paths.values()))
    kind = file_kind(first) if kind == "auto" else kind
    if kind not in DATASET_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(DATASET_KINDS)} or 'auto'")
    for path in paths.values():  # a bad row stops here, before TFDS starts writing
        for _ in _records(path, kind):
            pass
    name = name or _config_name(Path(first))
    described = ", ".join(f"{s}: {p}" for s, p in paths.items())
    config = BpoPreferencesConfig(name=name, description=f"{kind} from {described}", files=paths, kind=kind)
    builder = BpoPreferences(data_dir=str(data_dir), config=config)
    builder.download_and_prepare(file_format="array_record")
    return builder


def tfds_rows(
    reference: str, field_map: Mapping[str, str] | None = None, data_dir: str | Path | None = None
) -> Iterator[RawRow]:
    """Raw rows of a TFDS dataset split, for `records_from_rows` (see readers.is_tfds_reference).

    A dataset that cannot be opened raises one DataError naming the reference. `field_map` maps
    our fields to the dataset's (nested features as "a/b"); the dataset's other features pass through.
    """
    split = split_tfds_reference(reference)[1]
    builder = open_builder(reference, data_dir)
    label = reference if str(reference).endswith("]") else f"{reference}[{split}]"
    try:
        source = builder.as_data_source(split)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types here; all mean "cannot read this split"
        raise DataError(str(reference), None, "bad_file", f"cannot read split {split!r}: {e}") from None

    def row(i: int) -> RawRow:
        where = f"{label}:row {i + 1}"
        try:
            return where, i, _decode_example(source[i], field_map or {}, where)
        except DataError as e:
            return where, i, e

    # grain reads and decodes the array_record rows on a thread pool, in row order, so lookups
    # overlap (they are remote reads when the dataset lives on GCS).
    rows = grain.MapDataset.range(len(source)).map(row).to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS))
    return iter(rows)


def open_builder(reference: str | Path, data_dir: str | Path | None = None) -> tfds.core.DatasetBuilder:
    """The builder of a prepared dataset: a directory, or a registered name (under `data_dir`).

    Checks that the split exists and that the files are array_record (what reads without TF).
    """
    target, split = split_tfds_reference(reference)
    directory = "://" in target or target.startswith((".", "/", "~")) or Path(target).is_dir()
    try:
        if directory and "://" not in target:
            versions = tfds_version_dirs(Path(target).expanduser())
            if len(versions) != 1:
                found = f"found {', '.join(map(str, versions))}" if versions else "no dataset_info.json below it"
                raise ValueError(f"not one prepared TFDS dataset version ({found}); name the version directory")
            builder = tfds.builder_from_directory(str(versions[0]))
        elif directory:
            builder = tfds.builder_from_directory(target)
        elif prepared := _prepared_version(target, data_dir):
            builder = tfds.builder_from_directory(str(prepared))  # needs no builder class, nor a config list
        else:
            builder = tfds.builder(target, data_dir=None if data_dir is None else str(data_dir))
            if not builder.is_prepared():
                raise ValueError(f"not prepared under {builder.data_dir}")
        splits = builder.info.splits
        if split.split("[")[0] not in splits:
            raise ValueError(f"no split {split!r} (splits: {', '.join(sorted(splits)) or 'none'})")
    except Exception as e:  # noqa: BLE001 - unknown names, unreadable metadata, missing splits
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(str(reference), None, "bad_file", f"cannot open TFDS dataset: {first_line}") from None
    if str(builder.info.file_format) not in ("array_record", "FileFormat.ARRAY_RECORD"):
        raise DataError(str(reference), None, "bad_file",
                        f"prepared as {builder.info.file_format}; bpo_jax reads array_record datasets without "
                        "TensorFlow (rebuild with download_and_prepare(file_format='array_record'))")
    return builder


def _prepared_version(name: str, data_dir: str | Path | None) -> Path | None:
    """DATA_DIR/NAME[/CONFIG]/VERSION of a prepared dataset: the given version, else the newest."""
    name, _, version = name.partition(":")
    root = Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser() / name
    found = [d for d in tfds_version_dirs(root) if d.parent == root and (not version or d.name == version)]
    return max(found, key=lambda d: tfds.core.Version(d.name), default=None)


def read_tfds(
    name_or_dir: str | Path,
    split: str,
    field_map: Mapping[str, str] | None = None,
    data_dir: str | Path | None = None,
    skip_bad_rows: bool = False,
    kind: Kind = "pairs",
) -> tuple[list[Record], ReadReport]:
    """Records of any prepared array_record TFDS dataset (a registered name or a directory).

    `field_map` maps our fields to the dataset's, e.g. {"prompt": "question", "chosen": "good",
    "rejected": "bad"}; nested features are addressed as "a/b". Rows go through the same
    validation as file rows, with 'NAME[split]:row N' as their location.
    """
    reference = f"{name_or_dir}[{split}]"
    report = ReadReport(reference)
    records = list(records_from_rows(tfds_rows(reference, field_map, data_dir), kind, skip_bad_rows, report))
    return records, report


def _features(kind: str) -> dict[str, Any]:
    text = tfds.features.Text()
    fields: dict[str, Any] = {"id": text, "prompt": text}
    if kind == "pairs":
        fields.update(chosen=text, rejected=text, meta=text)
    elif kind == "scored":
        fields.update(
            responses=tfds.features.Sequence(text),
            rewards=tfds.features.Sequence(np.float64),
            truncated=tfds.features.Sequence(np.bool_),  # empty: not recorded
        )
    elif kind == "demonstrations":
        fields.update(response=text)
    elif kind != "prompts":
        raise ValueError(f"kind {kind!r} is not one of {', '.join(DATASET_KINDS)}")
    fields["conversational"] = tfds.features.Scalar(np.bool_)
    return fields


def _encode(record: Record, kind: str) -> dict[str, Any]:
    conv = isinstance(record.prompt, list)
    enc = (lambda v: json.dumps(v, ensure_ascii=False)) if conv else (lambda v: v)
    example = {"id": record.id, "prompt": enc(record.prompt), "conversational": conv}
    if kind == "pairs":
        example.update(chosen=enc(record.chosen), rejected=enc(record.rejected),
                       meta=json.dumps(record.meta, ensure_ascii=False))
    elif kind == "scored":
        example.update(responses=[enc(r) for r in record.responses], rewards=np.asarray(record.rewards, np.float64),
                       truncated=np.asarray(record.truncated or [], np.bool_))
    elif kind == "demonstrations":  # read_demonstrations gives pairs with chosen = the response
        example.update(response=enc(record.chosen))
    return example


def _decode_example(example: Mapping[str, Any], field_map: Mapping[str, str], where: str) -> dict[str, Any]:
    """A raw TFDS example as a row dict for the schema: mapped fields, bytes -> str, JSON undone."""
    row = {}
    for name, value in [*example.items(), *((ours, _lookup(example, theirs)) for ours, theirs in field_map.items())]:
        if value is None:
            continue
        try:
            row[name] = _to_python(value)
        except UnicodeDecodeError as e:
            raise DataError(where, field_map.get(name, name), "not_utf8", f"not valid UTF-8: {e}") from None
    conversational = bool(row.pop("conversational", False))
    if row.get("truncated") == []:  # our scored datasets store "not recorded" as an empty list
        del row["truncated"]
    for name in ("meta", *(_CONVERSATIONAL_FIELDS if conversational else ())):
        value = row.get(name)
        try:
            if isinstance(value, str):
                row[name] = json.loads(value) if value else None
            elif isinstance(value, list) and conversational:
                row[name] = [json.loads(v) if isinstance(v, str) else v for v in value]
        except json.JSONDecodeError as e:
            raise DataError(where, field_map.get(name, name), "invalid_json", f"invalid JSON: {e.msg}") from None
    return row


def _lookup(example: Mapping[str, Any], path: str) -> Any:
    value: Any = example
    for part in path.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _to_python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    return value


def _config_name(path: Path) -> str:
    stem = path.name.split(".")[0].lower()
    return "".join(c if c.isalnum() else "_" for c in stem) or "pairs"
