"""TFDS without TensorFlow: local pairs files -> array_record dataset -> the same examples back."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bpo_jax.data import DataError, read_records
from bpo_jax.data.tfds_builder import BpoPreferences, BpoPreferencesConfig, build_tfds_dataset, read_tfds

U = {"role": "user", "content": "2+2?"}
ROWS = [
    {"id": "plain", "prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "meta": {"margin": 1.5, "tags": ["x"]}},
    {"prompt": [{"role": "system", "content": "be brief"}, U], "chosen": "4", "rejected": [{"role": "assistant", "content": "5"}]},
    {"chosen": [U, {"role": "assistant", "content": "four"}], "rejected": [U, {"role": "assistant", "content": "five"}]},
    {"chosen": "Human: hi Assistant: hello there", "rejected": "Human: hi Assistant: go away", "meta": {}},
    {"prompt": "naïve café ✓", "chosen": "déjà", "rejected": "vu"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_built_dataset_yields_the_same_examples_as_the_jsonl_reader(tmp_path):
    src = _jsonl(tmp_path / "my-pairs.jsonl", ROWS)
    builder = build_tfds_dataset(src, tmp_path / "tfds")
    assert builder.name == "bpo_preferences" and builder.builder_config.name == "my_pairs"
    assert str(builder.version) == "1.0.0" and builder.info.splits["train"].num_examples == len(ROWS)
    source = builder.as_data_source("train")
    assert len(source) == len(ROWS)
    assert source[0]["id"] == b"plain" and source[1]["conversational"]  # random access, file order kept
    expected, _ = read_records(src, "pairs")
    from_builder, report = read_tfds(builder.data_dir, "train")
    assert from_builder == expected
    assert report.n_records == len(ROWS) and report.n_skipped == 0


def test_registered_builder_with_config_and_manual_dir(tmp_path):
    train = _jsonl(tmp_path / "a.jsonl", ROWS[:3])
    valid = _jsonl(tmp_path / "b.jsonl", ROWS[3:])
    config = BpoPreferencesConfig(name="two", files={"train": str(train), "validation": str(valid)})
    builder = tfds.builder("bpo_preferences", data_dir=tmp_path / "tfds", config=config)
    assert isinstance(builder, BpoPreferences)
    builder.download_and_prepare(file_format="array_record")
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "validation": 2}
    assert read_tfds(builder.data_dir, "validation")[0] == read_records(valid, "pairs")[0]

    manual = tmp_path / "manual"
    manual.mkdir()
    _jsonl(manual / "train.jsonl", ROWS)
    _jsonl(manual / "test.jsonl", ROWS[:1])
    builder = tfds.builder("bpo_preferences", data_dir=tmp_path / "tfds2")
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 5, "test": 1}
    # a registered name + data_dir works as well as a directory
    pairs, _ = read_tfds("bpo_preferences", "test", data_dir=tmp_path / "tfds2")
    assert pairs == read_records(manual / "test.jsonl", "pairs")[0]


def test_bad_source_row_fails_the_build_with_its_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "", "rejected": "r"}) + "\n")
    with pytest.raises(DataError, match=rf"{src}:2: field 'chosen': empty"):
        build_tfds_dataset(src, tmp_path / "tfds")


class ForeignPrefs(tfds.core.GeneratorBasedBuilder):
    """Someone else's dataset with its own field names and a nested feature."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "good": tfds.features.Text(), "extra": {"bad": tfds.features.Text()}}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (q, g, b) in enumerate([("q1", "g1", "b1"), ("q2", "", "b2"), ("q3", "g3", "b3")]):
            yield i, {"question": q, "good": g, "extra": {"bad": b}}


def test_read_any_tfds_dataset_with_a_field_map(tmp_path):
    ForeignPrefs(data_dir=tmp_path).download_and_prepare(file_format="array_record")
    field_map = {"prompt": "question", "chosen": "good", "rejected": "extra/bad"}
    with pytest.raises(DataError, match=r"^foreign_prefs\[train\]:row 2: field 'chosen': empty$"):
        read_tfds("foreign_prefs", "train", field_map, data_dir=tmp_path)
    pairs, report = read_tfds("foreign_prefs", "train", field_map, data_dir=tmp_path, skip_bad_rows=True)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("q1", "g1", "b1"), ("q3", "g3", "b3")]
    assert report.skipped == {"empty": 1}
    assert pairs[1].id.endswith("-2")  # derived ids use the dataset row
    assert np.all([p.meta == {} for p in pairs])
