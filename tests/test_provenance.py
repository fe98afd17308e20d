"""Provenance: a rerun with other settings redoes exactly the stale stages and everything downstream.

run_pipeline runs here with its stage functions replaced by recorders that write each stage's
outputs, so the bookkeeping (records, superseded outputs, config history) is tested in milliseconds.
"""

from __future__ import annotations

import json

import pytest
import yaml

from bpo_jax import pipeline, provenance
from bpo_jax.config import config_from_dict, config_to_dict


@pytest.fixture
def fake_stages(monkeypatch):
    """Stage functions that write their first output (marking it done) and record that they ran."""
    ran: list[str] = []

    def make(name):
        def stage(run):
            first = run.outputs(name)[0]
            if first.exists():
                return
            ran.append(name)
            first.parent.mkdir(parents=True, exist_ok=True)
            first.write_text(json.dumps({"stage": name, "beta": run.config.train.beta, "n": run.config.sample.n}))

        return stage

    monkeypatch.setattr(pipeline, "STAGE_FUNCTIONS", {name: make(name) for name in provenance.STAGES})
    monkeypatch.setattr(pipeline, "check_stage_inputs", lambda run, stage: None)  # the fakes write no done markers
    return ran


def config(tmp_path, **sections):
    return config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"init": {"vocab_size": 8}}, **sections})


def test_changed_beta_redoes_bpo_train_and_eval_only(tmp_path, fake_stages):
    pipeline.run_pipeline(config(tmp_path))
    assert fake_stages == list(provenance.STAGES)
    fake_stages.clear()

    pipeline.run_pipeline(config(tmp_path, train={"beta": 0.5}))
    # bpo's gradient features depend on beta too (they are DPO-loss gradients); sampling does not.
    assert fake_stages == ["bpo", "train", "eval"]
    root = tmp_path / "run"
    assert json.loads((root / "policy").read_text())["beta"] == 0.5
    [moved] = list((root / "superseded").iterdir())
    assert json.loads((moved / "policy").read_text())["beta"] == 0.1
    assert sorted(p.name for p in moved.iterdir()) == ["bpo", "eval", "policy"]
    # config.yaml describes the outputs; the earlier one is kept.
    assert yaml.safe_load((root / "config.yaml").read_text())["train"]["beta"] == 0.5
    [earlier] = list((root / "configs").iterdir())
    assert yaml.safe_load(earlier.read_text())["train"]["beta"] == 0.1
    record = json.loads((root / "provenance" / "train.json").read_text())
    assert record["status"] == "done" and record["settings"]["train.beta"] == 0.5
    assert record["environment"]["packages"]["numpy"] == __import__("numpy").__version__

    fake_stages.clear()
    pipeline.run_pipeline(config(tmp_path, train={"beta": 0.5}))
    assert fake_stages == []  # nothing stale: nothing redone


def test_changed_sample_key_redoes_everything_downstream(tmp_path, fake_stages, capsys):
    pipeline.run_pipeline(config(tmp_path))
    fake_stages.clear()
    pipeline.run_pipeline(config(tmp_path, sample={"n": 32}, train={"checkpoint_every": 7}, mesh={"data": 1}))
    assert fake_stages == ["sample", "score", "pairs", "bpo", "train", "eval"]
    assert "[sample] stale, settings changed since it ran (sample.n: 8 -> 32)" in capsys.readouterr().out


def test_changed_input_file_contents_make_its_readers_stale(tmp_path, fake_stages, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    pipeline.run_pipeline(config(tmp_path, data={"prompts": str(prompts)}, reward={"function": "operator:add"}))
    fake_stages.clear()
    prompts.write_text('{"prompt": "b"}\n')
    pipeline.run_pipeline(config(tmp_path, data={"prompts": str(prompts)}, reward={"function": "operator:add"}))
    assert fake_stages == ["stats", "sample", "score", "pairs", "bpo", "train", "eval"]
    assert f"data.prompts ({prompts}: contents changed)" in capsys.readouterr().out


def test_single_stage_on_a_stale_upstream_is_refused(tmp_path, fake_stages):
    pipeline.run_pipeline(config(tmp_path))
    fake_stages.clear()
    with pytest.raises(provenance.StaleUpstream, match=r"stage 'train' reads the outputs of stage 'sample'.*sample.n: 8 -> 16"):
        pipeline.run_pipeline(config(tmp_path, sample={"n": 16}), "train")
    assert fake_stages == []
    # A single stage whose own settings changed is redone, and its stale downstream is moved aside.
    pipeline.run_pipeline(config(tmp_path, train={"beta": 0.3}), "bpo")
    assert fake_stages == ["bpo"]
    assert not (tmp_path / "run" / "policy").exists() and not (tmp_path / "run" / "eval").exists()


def test_run_from_before_records_is_compared_with_its_config_yaml(tmp_path, fake_stages):
    cfg = config(tmp_path)
    pipeline.run_pipeline(cfg)
    root = tmp_path / "run"
    for f in (root / "provenance").iterdir():
        f.unlink()
    (root / "provenance").rmdir()
    fake_stages.clear()
    pipeline.run_pipeline(config(tmp_path, eval={"n": 3}))
    assert fake_stages == ["eval"]


def test_signature_keys_are_transitive_and_skip_result_neutral_keys():
    flat = provenance.signature("eval", config_to_dict(config_from_dict({"model": {"init": {"vocab_size": 8}}})))
    keys = flat["settings"]
    assert keys["model.init"] == {"vocab_size": 8} and "sample.n" in keys and "reward.kind" in keys
    assert not any(k.startswith(("mesh", "run_dir", "distributed")) for k in keys)
    assert "train.checkpoint_every" not in keys and "train.beta" in keys
    assert provenance.upstream("train") == ["sft", "sample", "score", "pairs", "bpo"]
