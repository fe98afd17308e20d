"""TFDS without TensorFlow: local pairs files -> array_record dataset -> the same examples back."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bpo_jax.config import ConfigError, DataSection, ModelSection, RunConfig, validate
from bpo_jax.data import DataError, read_records
from bpo_jax.data.readers import ReadReport, is_tfds_reference, read_demonstrations, records_from_rows, split_tfds_reference
from bpo_jax.data.tfds_builder import BpoPreferences, BpoPreferencesConfig, build_tfds_dataset, read_tfds, tfds_rows
from bpo_jax.demo_task import ASSETS as DEMO_ASSETS
from bpo_jax.main import main

U = {"role": "user", "content": "2+2?"}
TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 15, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": 1, "eos_token_id": 2}
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


# -- every record kind, and TFDS datasets as inputs wherever a data file is accepted ---------------
A = {"role": "assistant", "content": "fine"}
SCORED = [
    {"id": "g1", "prompt": "q1", "responses": ["a", "bb", "c"], "rewards": [1, 2.5, -0.5], "truncated": [False, True, False]},
    {"prompt": [U], "responses": ["four", [A]], "rewards": [0.25, 0.75]},  # conversational, no truncated flags
]
PROMPTS = [{"id": 7, "prompt": "sort 3 1 ="}, {"prompt": [{"role": "system", "content": "be brief"}, U]}]
DEMOS = [{"id": "d1", "prompt": "sort 3 1 =", "response": "1 3"}, {"prompt": [U], "response": "4"}]


@pytest.mark.parametrize("kind, rows", [("scored", SCORED), ("prompts", PROMPTS), ("pairs", ROWS), ("demonstrations", DEMOS)])
def test_every_kind_reads_back_as_the_jsonl_reader_reads_the_file(tmp_path, kind, rows):
    src = _jsonl(tmp_path / f"{kind}.jsonl", rows)
    builder = build_tfds_dataset(src, tmp_path / "tfds")  # kind inferred from the first row
    assert builder.builder_config.kind == kind
    if kind == "demonstrations":
        assert read_demonstrations(builder.data_dir) == read_demonstrations(src)
    else:
        assert read_records(builder.data_dir, kind)[0] == read_records(src, kind)[0]
        assert read_tfds(builder.data_dir, "train", kind=kind)[0] == read_records(src, kind)[0]


def test_references_by_name_directory_and_split(tmp_path, monkeypatch):
    train, test = _jsonl(tmp_path / "a.jsonl", ROWS[:3]), _jsonl(tmp_path / "b.jsonl", ROWS[3:])
    builder = build_tfds_dataset({"train": train, "test": test}, tmp_path / "tfds", name="mine")
    expected_train, expected_test = read_records(train, "pairs")[0], read_records(test, "pairs")[0]
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    config_dir = tmp_path / "tfds" / "bpo_preferences" / "mine"
    assert Path(builder.data_dir) == config_dir / "1.0.0"
    for reference, expected in [
        ("tfds:bpo_preferences/mine", expected_train),  # registered name, newest version, split train
        ("tfds:bpo_preferences/mine:1.0.0[test]", expected_test),
        (f"{config_dir}[test]", expected_test),  # a config directory with one version below it
        (f"{config_dir}/1.0.0", expected_train),
        (f"tfds:{config_dir}/1.0.0[test]", expected_test),
    ]:
        assert is_tfds_reference(reference), reference
        assert read_records(reference, "pairs")[0] == expected, reference
    assert not is_tfds_reference(train) and not is_tfds_reference(tmp_path / "tfds")  # a data_dir holds many
    assert split_tfds_reference(Path("tfds:gs://bucket/ds/1.0.0[test]")) == ("gs://bucket/ds/1.0.0", "test")


@pytest.mark.parametrize(
    "reference, message",
    [
        ("tfds:bpo_preferences/mine[validation]", r"cannot open TFDS dataset: no split 'validation' \(splits: train\)"),
        ("tfds:no_such_dataset", "cannot open TFDS dataset: Dataset no_such_dataset not found"),
        ("DATA_DIR", "a directory, neither a data file nor a prepared TFDS dataset"),
    ],
)
def test_unreadable_references_name_themselves(tmp_path, monkeypatch, reference, message):
    build_tfds_dataset(_jsonl(tmp_path / "mine.jsonl", ROWS), tmp_path / "tfds")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    reference = reference.replace("DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=rf"^{re.escape(reference)}: {message}"):
        read_records(reference, "pairs")


def test_bad_tfds_row_gets_the_jsonl_message_with_its_row(tmp_path):
    # A dataset prepared by someone else's builder, without our validation: an empty response.
    ForeignPrefs(data_dir=tmp_path).download_and_prepare(file_format="array_record")
    field_map = {"prompt": "question", "chosen": "good", "rejected": "extra/bad"}
    reference = f"{tmp_path / 'foreign_prefs' / '0.1.0'}[train]"
    with pytest.raises(DataError, match=rf"^{re.escape(reference)}:row 2: field 'chosen': empty$"):
        list(records_from_rows(tfds_rows(reference, field_map), "pairs", False, ReadReport(reference)))
    jsonl = _jsonl(tmp_path / "same.jsonl", [{"prompt": "q1", "chosen": "g1", "rejected": "b1"}, {"prompt": "q2", "chosen": "", "rejected": "b2"}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(jsonl))}:2: field 'chosen': empty$"):
        read_records(jsonl, "pairs")


def test_config_validation_opens_tfds_inputs(tmp_path):
    builder = build_tfds_dataset(_jsonl(tmp_path / "p.jsonl", ROWS), tmp_path / "tfds")
    good = RunConfig(model=ModelSection(tokenizer=str(DEMO_ASSETS), init=dict(TINY)), data=DataSection(pairs=builder.data_dir))
    validate(good)
    bad = dataclasses.replace(good, data=DataSection(pairs=f"{builder.data_dir}[test]"))
    with pytest.raises(ConfigError, match=r"data\.pairs: .*\[test\]: cannot open TFDS dataset: no split 'test'"):
        validate(bad)


def test_tfds_command_builds_and_rejects_bad_rows(tmp_path, capsys):
    pairs = _jsonl(tmp_path / "pairs.jsonl", ROWS)
    held_out = _jsonl(tmp_path / "held_out.jsonl", ROWS[:2])
    assert main(["tfds", "--data", str(pairs), "--data", f"test={held_out}", "--out", str(tmp_path / "out"), "--name", "prefs"]) == 0
    directory = tmp_path / "out" / "bpo_preferences" / "prefs" / "1.0.0"
    assert f"--set data.pairs={directory}[train]" in capsys.readouterr().out
    assert read_records(f"{directory}[test]", "pairs")[0] == read_records(held_out, "pairs")[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "q", "chosen": 3, "rejected": "r"}) + "\n")
    assert main(["tfds", "--data", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: field 'chosen': expected a string like 'prompt', got int"
    assert main(["tfds", "--data", str(pairs), "--out", str(tmp_path / "out"), "--kind", "bogus"]) == 2
    assert "kind 'bogus' is not one of" in capsys.readouterr().err


def test_parquet_files_build_the_same_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "prompt": "q1", "responses": ["x", "y"], "rewards": [0.5, 1.5]},
            {"id": "b", "prompt": "q2", "responses": ["z", "w", "v"], "rewards": [1.0, 0.0, 2.0]}]
    src = tmp_path / "scored.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    builder = build_tfds_dataset(src, tmp_path / "tfds")
    assert builder.builder_config.kind == "scored"
    assert read_records(builder.data_dir, "scored")[0] == read_records(_jsonl(tmp_path / "s.jsonl", rows), "scored")[0]
