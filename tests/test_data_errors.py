"""Bad input: one clear DataError naming file:line and field, or skipped and counted by reason."""

import gzip
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo_jax.data import DataError, read_records

GOOD = {
    "pairs": {"prompt": "q", "chosen": "a", "rejected": "b"},
    "scored": {"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, 0.0]},
    "prompts": {"prompt": "q"},
}
CHAT = [{"role": "user", "content": "q"}]


def _line(obj) -> bytes:
    return json.dumps(obj).encode()


# (kind, bad line, field named in the message or None, reason)
BAD_ROWS = {
    "invalid_json": ("pairs", b'{"prompt": "q", "chosen": ', None, "invalid_json"),
    "not_utf8": ("pairs", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', None, "not_utf8"),
    "not_object": ("pairs", b"[1, 2]", None, "not_object"),
    "missing_field": ("pairs", _line({"prompt": "q", "chosen": "a"}), "rejected", "missing_field"),
    "null_field": ("scored", _line({"prompt": None, "responses": ["a"], "rewards": [1]}), "prompt", "missing_field"),
    "prompt_wrong_type": ("prompts", _line({"prompt": 5}), "prompt", "wrong_type"),
    "message_content_type": (
        "pairs",
        _line({"prompt": CHAT, "chosen": [{"role": "assistant", "content": 3}], "rejected": "b"}),
        "chosen[0].content",
        "wrong_type",
    ),
    "message_missing_role": ("prompts", _line({"prompt": [{"content": "q"}]}), "prompt[0].role", "missing_field"),
    "chat_response_for_string_prompt": (
        "pairs",
        _line({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}),
        "chosen",
        "wrong_type",
    ),
    "response_not_assistant": (
        "pairs",
        _line({"prompt": CHAT, "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),
        "chosen[0].role",
        "wrong_type",
    ),
    "empty_prompt": ("pairs", _line({"prompt": "  \n", "chosen": "a", "rejected": "b"}), "prompt", "empty"),
    "empty_chat_prompt": ("prompts", _line({"prompt": []}), "prompt", "empty"),
    "empty_response": ("pairs", _line({"prompt": "q", "chosen": "a", "rejected": ""}), "rejected", "empty"),
    "empty_responses_list": ("scored", _line({"prompt": "q", "responses": [], "rewards": []}), "responses", "empty"),
    "rewards_length": (
        "scored",
        _line({"prompt": "q", "responses": ["a", "b"], "rewards": [1.0]}),
        "rewards",
        "length_mismatch",
    ),
    "nan_reward": ("scored", b'{"prompt": "q", "responses": ["a", "b"], "rewards": [0.5, NaN]}', "rewards[1]", "non_finite_reward"),
    "inf_reward": ("scored", b'{"prompt": "q", "responses": ["a"], "rewards": [-Infinity]}', "rewards[0]", "non_finite_reward"),
    "string_reward": ("scored", _line({"prompt": "q", "responses": ["a"], "rewards": ["1.0"]}), "rewards[0]", "wrong_type"),
    "bool_reward": ("scored", _line({"prompt": "q", "responses": ["a"], "rewards": [True]}), "rewards[0]", "wrong_type"),
    "truncated_length": (
        "scored",
        _line({"prompt": "q", "responses": ["a"], "rewards": [1], "truncated": [True, False]}),
        "truncated",
        "length_mismatch",
    ),
    "meta_type": ("pairs", _line({"prompt": "q", "chosen": "a", "rejected": "b", "meta": [1]}), "meta", "wrong_type"),
    "id_type": ("prompts", _line({"id": ["x"], "prompt": "q"}), "id", "wrong_type"),
}


def _file(tmp_path, kind, bad_line, suffix=".jsonl"):
    """good row, bad row (line 2), good row."""
    good = _line(GOOD[kind])
    raw = good + b"\n" + bad_line + b"\n" + good + b"\n"
    path = tmp_path / f"data{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_raises_one_clear_error(tmp_path, case, suffix):
    kind, bad, field, reason = BAD_ROWS[case]
    path = _file(tmp_path, kind, bad, suffix)
    with pytest.raises(DataError) as err:
        read_records(path, kind)
    e = err.value
    assert (e.reason, e.field, e.where) == (reason, field, f"{path}:2")
    prefix = f"{path}:2: field '{field}': " if field else f"{path}:2: "
    assert str(e).startswith(prefix), str(e)
    assert len(str(e).splitlines()) == 1


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_skipped_and_counted(tmp_path, case):
    kind, bad, _, reason = BAD_ROWS[case]
    path = _file(tmp_path, kind, bad)
    records, report = read_records(path, kind, skip_bad_rows=True)
    assert len(records) == 2 and [r.id.split("-")[1] for r in records] == ["0", "2"]
    assert (report.n_rows, report.n_records, report.skipped) == (3, 2, {reason: 1})
    assert report.examples[0].startswith(f"{path}:2:")


def test_skip_counts_many_reasons(tmp_path):
    lines = [_line(GOOD["scored"])] + [BAD_ROWS[c][1] for c in ("nan_reward", "rewards_length", "nan_reward", "invalid_json")]
    lines += [_line(GOOD["scored"])] * 2
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, report = read_records(path, "scored", skip_bad_rows=True)
    assert len(records) == 3
    assert report.skipped == {"non_finite_reward": 2, "length_mismatch": 1, "invalid_json": 1}
    assert report.to_dict()["n_skipped"] == 4
    with pytest.raises(DataError, match=rf"^{path}:2: field 'rewards\[1\]': reward is nan$"):
        read_records(path, "scored")


def test_parquet_rows_are_named_by_row_number(tmp_path):
    rows = [GOOD["scored"], {"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, math.nan]}, GOOD["scored"]]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"^{path}:row 2: field 'rewards\[1\]'"):
        read_records(path, "scored")
    records, report = read_records(path, "scored", skip_bad_rows=True)
    assert len(records) == 2 and report.skipped == {"non_finite_reward": 1}


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a"}]), path)
    with pytest.raises(DataError, match=rf"^{path}:row 1: field 'rejected': missing$"):
        read_records(path, "pairs")


@pytest.mark.parametrize(
    "name, content, exc, match",
    [
        ("d.jsonl.gz", b"not gzip at all", DataError, "cannot decompress"),
        ("d.parquet", b"not parquet", DataError, "not a readable Parquet file"),
        ("d.csv", b"a,b\n", DataError, "unsupported file type"),
        ("missing.jsonl", None, FileNotFoundError, "no such data file"),
    ],
)
def test_bad_files(tmp_path, name, content, exc, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(exc, match=match) as err:
        read_records(path, "pairs", skip_bad_rows=True)  # file-level problems are never skipped
    assert str(path) in str(err.value)
