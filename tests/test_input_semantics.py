"""Inputs that parse but mean nothing good: duplicate ids and keys, pairs without a preference,
hostile JSON, and YAML configs with aliases, duplicate keys or non-UTF-8 bytes."""

from __future__ import annotations

import json

import pytest

from bpo_jax.config import ConfigError, load_config
from bpo_jax.data import DataError, read_records

USER = {"role": "user", "content": "capital of France?"}


def write_lines(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("kind, second, field, reason, detail", [
    ("prompts", '{"id": "p1", "prompt": "b"}', "id", "duplicate_id", f"duplicate id 'p1' (first at {{f}}:1)"),
    ("scored", '{"id": "p1", "prompt": "b", "responses": ["x", "y"], "rewards": [1, 0]}', "id", "duplicate_id",
     "duplicate id 'p1' (first at {f}:1)"),
    ("pairs", '{"prompt": "q", "chosen": "same", "rejected": "same"}', "rejected", "same_as_chosen",
     "chosen and rejected are identical"),
    ("pairs", json.dumps({"chosen": [USER, {"role": "assistant", "content": "Paris"}],
                          "rejected": [USER, {"role": "assistant", "content": "Paris"}]}),
     "rejected", "same_as_chosen", "chosen and rejected are identical"),
    ("pairs", '{"prompt": "q", "chosen": "a", "rejected": "b", "chosen": "c"}', "chosen", "duplicate_key",
     "key appears twice"),
    ("pairs", '{"prompt": "q", "chosen": "a", "rejected": "b", "reward": ' + "9" * 5000 + "}", None, "invalid_json",
     "unreadable JSON: Exceeds the limit"),
    ("pairs", "[" * 100_000 + "]" * 100_000, None, "invalid_json", "unreadable JSON: nested too deeply"),
    ("prompts", '{"id": "p2", "prompt": "half an emoji \\ud83d"}', None, "not_text", "a lone UTF-16 surrogate"),
    ("scored", '{"prompt": "b", "responses": ["x", "y"], "rewards": [1' + "0" * 400 + ', 0]}', "rewards[0]",
     "non_finite_reward", "reward 100000000000... is too large"),
])
def test_meaningless_rows_name_file_line_and_field(tmp_path, kind, second, field, reason, detail):
    first = {"prompts": '{"id": "p1", "prompt": "a"}',
             "scored": '{"id": "p1", "prompt": "a", "responses": ["x", "y"], "rewards": [1, 0]}',
             "pairs": '{"prompt": "q", "chosen": "a", "rejected": "b"}'}[kind]
    f = write_lines(tmp_path / "data.jsonl", first, second)
    with pytest.raises(DataError) as e:
        read_records(f, kind)
    assert (e.value.where, e.value.field, e.value.reason) == (f"{f}:2", field, reason)
    assert detail.format(f=f) in e.value.detail

    records, report = read_records(f, kind, skip_bad_rows=True)  # skip-and-count instead
    assert len(records) == 1 and report.skipped == {reason: 1} and report.examples[0].startswith(f"{f}:2:")


def test_derived_ids_of_distinct_rows_never_collide(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", '{"prompt": "a"}', '{"prompt": "a"}', '{"prompt": "b"}')
    records, _ = read_records(f, "prompts")
    assert len({r.id for r in records}) == 3


@pytest.mark.parametrize("text, where, problem", [
    ("run_dir: &d runs/x\ntrain:\n  beta: 0.1\neval: {n: 1}\nother: *d\n", ":5", "YAML alias *d is not supported"),
    ("train:\n  beta: 0.1\n  beta: 0.5\n", ":3", "train.beta: duplicate key (first at {f}:2)"),
    ("run_dir: x\nrun_dir: y\n", ":2", "run_dir: duplicate key (first at {f}:1)"),
])
def test_config_aliases_and_duplicate_keys_are_refused(tmp_path, text, where, problem):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, check_files=False)
    assert str(e.value).startswith(f"{f}{where}: ") and problem.format(f=f) in str(e.value)


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")  # 9**9 strings if expanded
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml:2: YAML alias \*a is not supported"):
        load_config(f, check_files=False)


def test_config_with_latin1_bytes_names_the_byte(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"run_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{f}: not UTF-8 text \(byte 0xe9 at offset 12\)$"):
        load_config(f, check_files=False)


def test_skipped_rows_are_named_in_a_warning_before_the_run(tmp_path, capsys):
    from bpo_jax.config import config_from_dict
    from bpo_jax.pipeline import check_inputs

    pairs = write_lines(tmp_path / "pairs.jsonl", '{"prompt": "q", "chosen": "a", "rejected": "b"}',
                        '{"prompt": "q", "chosen": "a", "rejected": "a"}', '{"prompt": "q", "chosen": "a"}')
    config = config_from_dict({"run_dir": str(tmp_path / "run"), "data": {"pairs": str(pairs), "skip_bad_rows": True}})
    check_inputs(config)
    assert capsys.readouterr().out == (
        f"warning: {pairs}: skipping 2 of 3 rows (1 missing_field, 1 same_as_chosen); first: {pairs}:2: field "
        f"'rejected': chosen and rejected are identical: no preference; {pairs}:3: field 'rejected': missing\n")
