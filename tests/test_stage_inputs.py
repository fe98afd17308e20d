"""A single stage whose inputs do not exist yet names the stage that writes them (no traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bpo_jax.config import BpoSection, DataSection, RunConfig, SftSection
from bpo_jax.data.schema import DataError
from bpo_jax.main import main
from bpo_jax.pipeline import Run
from bpo_jax.stage_inputs import check_stage_inputs, needed_outputs

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SFT = SftSection(enabled=True, data="sft.jsonl")


def _run(tmp_path: Path, data: DataSection = DataSection(prompts="p.jsonl"), sft: SftSection = SftSection(),
         allocator: str = "gradient") -> Run:
    bpo = BpoSection(depth_allocator="off", pairs_per_prompt=2) if allocator == "uniform k" else BpoSection(depth_allocator=allocator)
    return Run(RunConfig(run_dir=str(tmp_path / "run"), data=data, sft=sft, bpo=bpo))


# (data section, sft, depth allocator, stage) -> the stages whose outputs it reads, in check order.
# "uniform k": no depth allocator, bpo.pairs_per_prompt = 2 (uniform balancing in the bpo stage).
CASES = [
    (DataSection(prompts="p.jsonl"), SftSection(), "gradient", "stats", []),
    (DataSection(prompts="p.jsonl"), SFT, "gradient", "sft", []),
    (DataSection(prompts="p.jsonl"), SFT, "gradient", "sample", ["sft"]),
    (DataSection(prompts="p.jsonl"), SftSection(), "gradient", "sample", []),
    (DataSection(prompts="p.jsonl"), SFT, "gradient", "score", ["sample"]),
    (DataSection(prompts="p.jsonl"), SFT, "gradient", "pairs", ["score"]),
    (DataSection(prompts="p.jsonl"), SFT, "gradient", "bpo", ["score", "sft"]),
    (DataSection(prompts="p.jsonl"), SFT, "margin", "bpo", ["score"]),  # no model needed without gradients
    (DataSection(prompts="p.jsonl"), SFT, "gradient", "train", ["bpo", "sft"]),
    (DataSection(prompts="p.jsonl"), SftSection(), "off", "train", ["pairs"]),
    (DataSection(prompts="p.jsonl"), SFT, "uniform k", "bpo", ["score"]),  # bpo.pairs_per_prompt balancing
    (DataSection(prompts="p.jsonl"), SftSection(), "uniform k", "train", ["bpo"]),
    (DataSection(prompts="p.jsonl"), SftSection(), "gradient", "eval", ["train"]),
    (DataSection(scored="s.jsonl"), SftSection(), "gradient", "score", []),
    (DataSection(scored="s.jsonl"), SftSection(), "gradient", "pairs", []),
    (DataSection(scored="s.jsonl"), SftSection(), "gradient", "bpo", []),
    (DataSection(scored="s.jsonl"), SftSection(), "off", "train", ["pairs"]),
    (DataSection(pairs="t.jsonl"), SftSection(), "gradient", "train", []),
    (DataSection(pairs="t.jsonl"), SFT, "gradient", "train", ["sft"]),
    (DataSection(pairs="t.jsonl"), SFT, "gradient", "sample", []),
]


@pytest.mark.parametrize("data, sft, allocator, stage, producers", CASES)
def test_each_stage_needs_the_outputs_of_the_stages_before_it(tmp_path, data, sft, allocator, stage, producers):
    run = _run(tmp_path, data, sft, allocator)
    needs = needed_outputs(run, stage)
    assert [producer for producer, _, _ in needs] == producers
    if needs:
        producer, path, _ = needs[0]
        with pytest.raises(DataError, match=rf"^{path}: stage '{stage}' reads this output of stage '{producer}', "
                                            rf"which has not finished here: run stage '{producer}' first \(or all stages\)$"):
            check_stage_inputs(run, stage)
    for _, _, marker in needs:  # once every producer has written its done marker, the stage may start
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    check_stage_inputs(run, stage)


def test_train_never_falls_back_to_the_pairs_stage_file_when_bpo_has_not_run(tmp_path):
    run = _run(tmp_path)
    run.pairs_dir.mkdir(parents=True)
    (run.pairs_dir / "pairs.jsonl").write_text("")
    (run.pairs_dir / "pairs_report.json").write_text("{}")
    with pytest.raises(DataError, match=r"train_pairs\.jsonl: stage 'train' reads this output of stage 'bpo'"):
        check_stage_inputs(run, "train")


def test_cli_single_stage_names_the_missing_stage(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--config", str(DEMO), "--set", f"run_dir={run_dir}", "--set", "mesh.data=-1", "train"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {run_dir / 'train_pairs.jsonl'}: stage 'train' reads this output of stage 'bpo', "
                           "which has not finished here: run stage 'bpo' first (or all stages)")
    assert not (run_dir / "train").exists()
