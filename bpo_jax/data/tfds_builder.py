"""TFDS without TensorFlow: local preference files as a versioned array_record dataset, and reading.

`BpoPreferences` ("bpo_preferences") is a GeneratorBasedBuilder whose splits come from pairs files
(JSONL/Parquet, read with our validating reader): either a `BpoPreferencesConfig(name, files=
{"train": path, ...})` or, with no config, every `<split>.jsonl` / `<split>.parquet` in the manual
directory. Importing this module registers it, so this works without TensorFlow:

    builder = tfds.builder("bpo_preferences", data_dir=d, config=BpoPreferencesConfig("mine", files={...}))
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source("train")   # random access; read_tfds reads it with grain

Examples keep the file order (shuffling at preparation is disabled). Conversational fields are
stored as JSON text with `conversational=True`; plain strings as they are.

What needs TensorFlow and is therefore avoided here: `tfds.load(...)` / `builder.as_dataset(...)`
(tf.data pipelines), preparing or reading the default "tfrecord" file format, and the
`tfds build` CLI for datasets prepared that way. `as_data_source` / `tfds.data_source` on
array_record data do not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import grain
import numpy as np
import tensorflow_datasets as tfds

from bpo_jax.data.readers import ReadReport, iter_records, records_from_rows
from bpo_jax.data.schema import DataError, PreferencePair

_SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
READ_THREADS = 8  # parallel row reads in read_tfds


@dataclasses.dataclass(eq=False)
class BpoPreferencesConfig(tfds.core.BuilderConfig):
    """A named dataset made of pairs files: `files` maps split name -> path."""

    files: dict[str, str] = dataclasses.field(default_factory=dict)


class BpoPreferences(tfds.core.GeneratorBasedBuilder):
    """Preference pairs {id, prompt, chosen, rejected, meta} from local files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = BpoPreferencesConfig
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Without a config, put <split>.jsonl (or .parquet) pairs files in the manual dir."
    # TFDS 4.9.10 derives this via `importlib_resources`, which it only installs for Python < 3.9.
    code_path = tfds.core.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Preference pairs prepared by bpo_jax from local files.",
            features=tfds.features.FeaturesDict(
                {
                    "id": text,
                    "prompt": text,
                    "chosen": text,
                    "rejected": text,
                    "meta": text,
                    "conversational": tfds.features.Scalar(np.bool_),
                }
            ),
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
        for i, pair in enumerate(iter_records(path, "pairs")):
            yield i, _encode_pair(pair)


def build_tfds_dataset(
    path: str | Path, data_dir: str | Path, name: str | None = None, split: str = "train"
) -> BpoPreferences:
    """Prepare one pairs file as split `split` of bpo_preferences/<name> under `data_dir`."""
    path = Path(path).resolve()
    name = name or _config_name(path)
    config = BpoPreferencesConfig(name=name, description=f"pairs from {path}", files={split: str(path)})
    builder = BpoPreferences(data_dir=str(data_dir), config=config)
    builder.download_and_prepare(file_format="array_record")
    return builder


def read_tfds(
    name_or_dir: str | Path,
    split: str,
    field_map: Mapping[str, str] | None = None,
    data_dir: str | Path | None = None,
    skip_bad_rows: bool = False,
) -> tuple[list[PreferencePair], ReadReport]:
    """Pairs from any prepared array_record TFDS dataset (a registered name or a version directory).

    `field_map` maps our fields to the dataset's, e.g. {"prompt": "question", "chosen": "good",
    "rejected": "bad"}; nested features are addressed as "a/b". Rows go through the same
    validation as file rows, with 'name[split]:row N' as their location.
    """
    path = Path(name_or_dir)
    if path.is_dir():
        builder = tfds.builder_from_directory(str(path))
    else:
        builder = tfds.builder(str(name_or_dir), data_dir=None if data_dir is None else str(data_dir))
    source = builder.as_data_source(split)
    label = f"{builder.name}[{split}]"
    report = ReadReport(label)

    def row(i: int) -> tuple[str, int, Any]:
        where = f"{label}:row {i + 1}"
        try:
            return where, i, _decode_example(source[i], field_map or {}, where)
        except DataError as e:
            return where, i, e

    # grain reads and decodes the array_record rows on a thread pool, in row order, so lookups
    # overlap (they are remote reads when the dataset lives on GCS).
    rows = grain.MapDataset.range(len(source)).map(row).to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS))
    pairs = list(records_from_rows(iter(rows), "pairs", skip_bad_rows, report))
    return pairs, report


def _encode_pair(pair: PreferencePair) -> dict[str, Any]:
    conv = pair.conversational
    enc = (lambda v: json.dumps(v, ensure_ascii=False)) if conv else (lambda v: v)
    return {
        "id": pair.id,
        "prompt": enc(pair.prompt),
        "chosen": enc(pair.chosen),
        "rejected": enc(pair.rejected),
        "meta": json.dumps(pair.meta, ensure_ascii=False),
        "conversational": conv,
    }


def _decode_example(example: Mapping[str, Any], field_map: Mapping[str, str], where: str) -> dict[str, Any]:
    """A raw TFDS example as a row dict for the schema: mapped fields, bytes -> str, JSON undone."""
    conversational = bool(example.get("conversational", False))
    row = {}
    for ours in ("id", "prompt", "chosen", "rejected", "meta"):
        theirs = field_map.get(ours, ours)
        value = _lookup(example, theirs)
        if value is None:
            continue
        try:
            value = _to_python(value)
        except UnicodeDecodeError as e:
            raise DataError(where, theirs, "not_utf8", f"not valid UTF-8: {e}") from None
        if isinstance(value, str) and (ours == "meta" or (conversational and ours != "id")):
            try:
                value = json.loads(value) if value else None
            except json.JSONDecodeError as e:
                raise DataError(where, theirs, "invalid_json", f"invalid JSON: {e.msg}") from None
        row[ours] = value
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
    return value


def _config_name(path: Path) -> str:
    stem = path.name.split(".")[0].lower()
    return "".join(c if c.isalnum() else "_" for c in stem) or "pairs"
