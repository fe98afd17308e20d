"""Breadth B and depth K of small files, checked by hand; table, JSON and PNG written."""

import json

import pytest

from bpo_jax.data import dataset_stats, write_stats

U = [{"role": "user", "content": "hi"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pairs_file(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "a", "chosen": "x", "rejected": "z"},
        {"prompt": "a", "chosen": "y", "rejected": "z"},
        {"prompt": "b", "chosen": "p", "rejected": "q"},
        {"prompt": U, "chosen": "x", "rejected": "y"},
        {"prompt": [dict(U[0])], "chosen": "x", "rejected": "z"},  # an equal conversation is the same prompt
        {"prompt": "c", "chosen": "p", "rejected": "q"},
    ]
    return _jsonl(tmp_path / "pairs.jsonl", rows)


def test_pairs_breadth_depth_by_hand(pairs_file):
    s = dataset_stats(pairs_file)
    # prompts a, b, U, c with 3, 1, 2, 1 pairs
    assert (s["kind"], s["n_records"], s["breadth"]) == ("pairs", 7, 4)
    assert s["depth"] == {"unit": "pairs per prompt", "total": 7, "mean": 1.75, "min": 1, "median": 1.5, "max": 3}
    assert s["depth_histogram"] == {1: 2, 2: 1, 3: 1}
    # distinct responses: a {x, y, z}, b {p, q}, U {x, y, z}, c {p, q}
    r = s["responses_per_prompt"]
    assert (r["total"], r["min"], r["max"], r["mean"]) == (10, 2, 3, 2.5)


def test_scored_and_prompt_files(tmp_path):
    scored = _jsonl(
        tmp_path / "scored.jsonl",
        [
            {"prompt": "a", "responses": ["1", "2", "3"], "rewards": [0, 1, 2]},
            {"prompt": "b", "responses": ["1", "2"], "rewards": [0, 1]},
            {"prompt": "a", "responses": ["4", "5", "6", "7"], "rewards": [0, 1, 2, 3]},
        ],
    )
    s = dataset_stats(scored)
    assert (s["kind"], s["breadth"], s["depth"]["unit"]) == ("scored", 2, "responses per prompt")
    assert s["depth_histogram"] == {2: 1, 7: 1} and s["depth"]["total"] == 9
    assert "responses_per_prompt" not in s

    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}])
    s = dataset_stats(prompts)
    assert (s["kind"], s["breadth"], s["depth_histogram"]) == ("prompts", 2, {1: 1, 2: 1})


def test_write_stats_table_json_and_png(pairs_file, tmp_path, capsys):
    out = tmp_path / "out"
    text = write_stats(pairs_file, out)
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    assert "breadth B     4 unique prompts" in lines
    assert any(line.startswith("depth K") and "mean 1.75" in line and "max 3" in line for line in lines)
    assert lines[-3:] == ["     1  2", "     2  1", "     3  1"]
    saved = json.loads((out / "pairs.stats.json").read_text())
    assert saved["breadth"] == 4 and saved["depth_histogram"] == {"1": 2, "2": 1, "3": 1}
    png = (out / "pairs.depth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no records"):
        dataset_stats(_jsonl(tmp_path / "e.jsonl", []))
