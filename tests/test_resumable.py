"""Resumable stage output: whole chunks only, no duplicates whenever the run is killed."""

from __future__ import annotations

import json
import shutil

import pytest

from bpo_jax import resumable
from bpo_jax.resumable import ResumableJsonl, ResumeError, check_unique_ids


def records(*ids: str) -> list[dict]:
    return [{"id": i, "value": f"v{i}"} for i in ids]


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chunks_then_finalize(tmp_path):
    out = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"})
    assert out.done_ids() == set()
    out.write_chunk(records("a", "b"))
    out.write_chunk([])  # nothing to write: no empty part file
    out.write_chunk(records("c"))
    assert sorted(p.name for p in out.parts.iterdir()) == ["000-000000.jsonl", "000-000001.jsonl", "settings.json"]
    again = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"})  # a rerun sees what is done
    assert again.done_ids() == {"a", "b", "c"} and not (tmp_path / "o.jsonl").exists()
    again.finalize()
    assert read(tmp_path / "o.jsonl") == records("a", "b", "c") and not out.parts.exists()
    # a later run appends to the finished output
    more = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"})
    assert more.done_ids() == {"a", "b", "c"}
    more.write_chunk(records("d"))
    more.finalize()
    assert read(tmp_path / "o.jsonl") == records("a", "b", "c", "d")



def test_parts_of_several_processes_join_in_input_order(tmp_path, monkeypatch):
    """Multi-host: each process writes its share's chunks under its own name; finalize puts the
    records in the input's order, whatever the number of writers or the order they wrote in."""
    order = ["a", "b", "c", "d", "e"]
    for process, ids in ((1, "bd"), (0, "ace")):  # process p of 2 takes input records p, p + 2, ...
        monkeypatch.setattr(resumable.jax, "process_index", lambda p=process: p)
        writer = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"})
        writer.write_chunk(records(*ids[:1]))
        writer.write_chunk(records(*ids[1:]))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / ".o.jsonl.parts").glob("*.jsonl")) == [
        "000-000000.jsonl", "000-000001.jsonl", "001-000000.jsonl", "001-000001.jsonl"]
    ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"}).finalize(order)
    assert read(tmp_path / "o.jsonl") == records(*order)

def test_kill_between_writing_the_output_and_removing_the_parts(tmp_path, monkeypatch):
    out = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"})
    out.write_chunk(records("a", "b"))
    out.write_chunk(records("c"))
    saved = tmp_path / "saved_parts"
    shutil.copytree(out.parts, saved)

    def killed(path):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(resumable.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        out.finalize()
    monkeypatch.undo()
    assert read(tmp_path / "o.jsonl") == records("a", "b", "c") and out.parts.exists()
    # the rerun finds every id once, writes nothing new and joins without duplicates
    rerun = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"})
    assert rerun.done_ids() == {"a", "b", "c"}
    rerun.finalize()
    assert read(tmp_path / "o.jsonl") == records("a", "b", "c") and not out.parts.exists()


def test_a_torn_part_is_never_left_behind(tmp_path, monkeypatch):
    """A chunk is written atomically: a kill while writing it leaves no part at all."""
    out = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"})
    out.write_chunk(records("a"))

    def rows_then_kill():
        yield records("b")[0]
        raise KeyboardInterrupt("killed mid-chunk")

    real = resumable.write_jsonl

    def write_lazily(path, rows, **options):
        return real(path, rows_then_kill(), **options)

    monkeypatch.setattr(resumable, "write_jsonl", write_lazily)
    with pytest.raises(KeyboardInterrupt):
        out.write_chunk(records("b", "c"))
    monkeypatch.undo()
    assert ResumableJsonl(tmp_path / "o.jsonl", {"stage": "x"}).done_ids() == {"a"}
    assert sorted(p.name for p in out.parts.iterdir()) == ["000-000000.jsonl", "settings.json"]


def test_other_settings_are_refused(tmp_path):
    out = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "sample", "temperature": 1.0, "n": 4})
    out.write_chunk(records("a"))
    other = ResumableJsonl(tmp_path / "o.jsonl", {"stage": "sample", "temperature": 0.7, "n": 4, "top_k": 5})
    with pytest.raises(ResumeError, match=r"\.o\.jsonl\.parts: partial output of a run with other settings "
                                          r"\(temperature: 1\.0 -> 0\.7, top_k: None -> 5\)"):
        other.done_ids()


def test_unreadable_output_record_names_file_line_and_field(tmp_path):
    (tmp_path / "o.jsonl").write_text('{"id": "a"}\n\n{"value": 1}\n')
    with pytest.raises(ResumeError, match=r"o\.jsonl:3: field 'id': unreadable output record"):
        ResumableJsonl(tmp_path / "o.jsonl", {}).done_ids()
    (tmp_path / "o.jsonl").write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(ResumeError, match=r"o\.jsonl:2: field 'id'"):
        ResumableJsonl(tmp_path / "o.jsonl", {}).done_ids()


def test_duplicate_input_ids():
    check_unique_ids(["a", "b", "c"], "in.jsonl")
    with pytest.raises(ResumeError, match=r"in.jsonl: record 4: field 'id': duplicate id 'b' \(first in record 2\)"):
        check_unique_ids(["a", "b", "c", "b"], "in.jsonl")
