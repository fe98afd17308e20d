"""Every accepted input format reads to the expected normalized records and round-trips."""

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bpo_jax.data import (
    DataError,
    PreferencePair,
    PromptRecord,
    ScoredGroup,
    read_records,
    split_implicit_prompt,
    write_records,
)


def _m(role, content):
    return {"role": role, "content": content}


SYS, U1, A1, U2 = _m("system", "be brief"), _m("user", "hi"), _m("assistant", "hello"), _m("user", "2+2?")

# name -> (kind, raw rows, expected records); rows carry ids so that expected ids are known.
CASES = {
    "pairs_plain": (
        "pairs",
        [{"id": "a", "prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "meta": {"src": "x"}}],
        [PreferencePair("a", "Q: 2+2?", " 4", " 5", {"src": "x"})],
    ),
    "pairs_chat_multiturn": (
        "pairs",
        [
            {"id": "a", "prompt": [SYS, U1, A1, U2], "chosen": [_m("assistant", "4")], "rejected": [_m("assistant", "5")]},
        ],
        [PreferencePair("a", [SYS, U1, A1, U2], [_m("assistant", "4")], [_m("assistant", "5")])],
    ),
    "pairs_chat_string_responses": (  # a bare string after a conversational prompt is one assistant turn
        "pairs",
        [{"id": "b", "prompt": [U2], "chosen": "4", "rejected": [_m("assistant", "5")]}],
        [PreferencePair("b", [U2], [_m("assistant", "4")], [_m("assistant", "5")])],
    ),
    "pairs_chat_implicit": (
        "pairs",
        [
            {"id": "a", "chosen": [U1, A1, U2, _m("assistant", "4")], "rejected": [U1, A1, U2, _m("assistant", "5")]},
            # they differ at an earlier assistant turn: everything from there on is the response
            {"id": "b", "chosen": [U1, A1, U2, _m("assistant", "4")], "rejected": [U1, _m("assistant", "go away")]},
        ],
        [
            PreferencePair("a", [U1, A1, U2], [_m("assistant", "4")], [_m("assistant", "5")]),
            PreferencePair("b", [U1], [A1, U2, _m("assistant", "4")], [_m("assistant", "go away")]),
        ],
    ),
    "pairs_plain_implicit": (
        "pairs",
        [{"id": "a", "chosen": "\n\nHuman: 2+2?\n\nAssistant: It is 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: It is 5"}],
        [PreferencePair("a", "\n\nHuman: 2+2?\n\nAssistant: It is", " 4", " 5")],
    ),
    "scored_plain": (
        "scored",
        [{"id": 7, "prompt": "p", "responses": ["r1", "r2", "r3"], "rewards": [0.5, -1, 2.25], "truncated": [False, True, False]}],
        [ScoredGroup("7", "p", ["r1", "r2", "r3"], [0.5, -1.0, 2.25], [False, True, False])],
    ),
    "scored_chat": (
        "scored",
        [{"id": "g", "prompt": [U1], "responses": [[_m("assistant", "x")], [_m("assistant", "y")]], "rewards": [1.0, 0.0]}],
        [ScoredGroup("g", [U1], [[_m("assistant", "x")], [_m("assistant", "y")]], [1.0, 0.0])],
    ),
    "scored_chat_string_responses": (
        "scored",
        [{"id": "g", "prompt": [U1], "responses": ["x", [_m("assistant", "y")]], "rewards": [1.0, 0.0]}],
        [ScoredGroup("g", [U1], [[_m("assistant", "x")], [_m("assistant", "y")]], [1.0, 0.0])],
    ),
    "prompts_plain": ("prompts", [{"id": "p0", "prompt": "tell me a joke"}], [PromptRecord("p0", "tell me a joke")]),
    "prompts_chat": ("prompts", [{"id": "p1", "prompt": [SYS, U1]}], [PromptRecord("p1", [SYS, U1])]),
}
# Arrow columns have one type: a column mixing strings and message lists exists only in JSONL.
JSONL_ONLY = {"pairs_chat_string_responses", "scored_chat_string_responses"}


def _write(tmp_path, rows, fmt):
    if fmt == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "jsonl.gz":
        path = tmp_path / "data.jsonl.gz"
        path.write_bytes(gzip.compress(text))
    else:
        path = tmp_path / "data.jsonl"
        path.write_bytes(text)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_format_reads_and_round_trips(tmp_path, case, fmt):
    kind, rows, expected = CASES[case]
    if fmt == "parquet" and case in JSONL_ONLY:
        pytest.skip("Arrow cannot store a column that mixes strings and message lists")
    path = _write(tmp_path, rows, fmt)
    records, report = read_records(path, kind)
    assert records == expected
    assert (report.n_rows, report.n_records, report.n_skipped, report.kind) == (len(rows), len(rows), 0, kind)
    auto, _ = read_records(path, "auto")
    assert auto == expected
    out = tmp_path / "out.jsonl"
    assert write_records(out, records) == len(records)
    again, _ = read_records(out, kind)
    assert again == records


def test_derived_ids_are_prompt_hash_plus_line(tmp_path):
    conv = [U1]
    rows = [{"prompt": "same"}, {"prompt": "same"}, {"prompt": conv}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    records, report = read_records(path, "prompts")
    assert report.n_rows == 3  # the blank line is not a row ...
    h_same = hashlib.sha256(b"same").hexdigest()[:10]
    h_conv = hashlib.sha256(b'[{"content":"hi","role":"user"}]').hexdigest()[:10]
    # ... but ids use line positions, so they do not depend on how blank lines are counted
    assert [r.id for r in records] == [f"{h_same}-0", f"{h_same}-2", f"{h_conv}-3"]
    assert [r.id for r in read_records(path, "prompts")[0]] == [r.id for r in records]


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("The answer is 42", "The answer is 43", ("The answer is", " 42", " 43")),
        ("A: x", "A:\nx", ("A:", " x", "\nx")),  # both continue with whitespace: split right there
        ("A: yes", "A: yes please", ("A:", " yes", " yes please")),  # one is a prefix of the other
        ("Q: hi\n\nA:  sure", "Q: hi\n\nA:  no", ("Q: hi\n\nA:", "  sure", "  no")),
    ],
)
def test_split_implicit_prompt_strings(chosen, rejected, expected):
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert (prompt, c, r) == expected
    assert prompt + c == chosen and prompt + r == rejected


@pytest.mark.parametrize(
    "chosen, rejected, reason",
    [
        ([U1, A1], [U1], "empty"),
        ("abc", "abd", "no_shared_prompt"),
        ([U1, _m("assistant", "a")], [U2, _m("assistant", "a")], "no_shared_prompt"),
        ([U1, A1, U1], [U1, A1, U2], "wrong_type"),  # responses would end with a user turn
    ],
)
def test_split_implicit_prompt_failures(tmp_path, chosen, rejected, reason):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path, "pairs")
    assert err.value.reason == reason
    assert str(err.value).startswith(f"{path}:1: field '")
