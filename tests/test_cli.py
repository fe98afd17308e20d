"""The command line's manners: a light --help, one-line user errors (exit 2), a resume hint on Ctrl-C."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bpo_jax import main as cli
from bpo_jax.provenance import STAGES


def test_help_lists_every_stage_without_importing_jax():
    code = ("import sys\nfrom bpo_jax.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('JAX LOADED' if 'jax' in sys.modules else 'NO JAX')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("NO JAX")
    for stage in STAGES:
        assert f"\n  {stage:<7} " in out


def test_ctrl_c_prints_one_line_resume_hint(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    assert cli.main(["--config", "x.yaml"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == cli.RESUME_HINT and "Traceback" not in err


@pytest.mark.parametrize("content, args, expected", [
    (None, ["--data", "{d}/missing.jsonl"], "error: {d}/missing.jsonl: no such data file"),
    ("", ["--data", "{d}/f.jsonl"], "error: {d}/f.jsonl: no records to compute statistics on"),
    ('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "b", "chosen": "x"}\n', ["--data", "{d}/f.jsonl"],
     "error: {d}/f.jsonl:2: field 'rejected':"),
    ('{"prompt": "a", "chosen": "x", "rejected": "y"}\n', ["--data", "{d}/f.jsonl", "--out", "{d}/f.jsonl/out"],
     "error: {d}/f.jsonl/out: Not a directory"),
])
def test_stats_user_errors_are_one_line_with_exit_2(tmp_path, capsys, content, args, expected):
    if content is not None:
        (tmp_path / "f.jsonl").write_text(content)
    assert cli.main(["stats", *(a.format(d=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected.format(d=tmp_path)) and err.count("\n") == 1, err


def test_mesh_error_says_how_to_emulate_devices(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  init: {architectures: [LlamaForCausalLM], vocab_size: 8, hidden_size: 8, intermediate_size: 8,\n"
                      "         num_hidden_layers: 1, num_attention_heads: 1}\nmesh: {data: 3}\n")
    assert cli.main(["--config", str(config), "train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: mesh:") and "XLA_FLAGS=--xla_force_host_platform_device_count=N" in err


DEMO = ["--config", "configs/demo.yaml", "--set", "mesh.data=-1"]  # -1: every (emulated) device


@pytest.mark.parametrize("overrides, expected", [
    (["data.prompts={d}/empty.jsonl"], "{d}/empty.jsonl: no prompts records in the file"),
    (["reward.function=operator:neg"],
     "reward.function operator:neg: cannot be called as f(prompts, responses) with two lists"),
    (["reward.function=no_such_module_xyz:f"], "rule reward 'no_such_module_xyz:f': cannot import module"),
    (["run_dir={d}/empty.jsonl/run"], "{d}/empty.jsonl/run: run_dir is not writable (Not a directory)"),
    (["model.init.vocab_size=8"], "bpo_jax/assets/demo_sort/tokenizer.json: model.tokenizer: the tokenizer has 15 "
                                  "tokens but the model's vocabulary only 8"),
    (["sample.min_new_tokens=20"], "sample.min_new_tokens: must not exceed sample.max_new_tokens (10), got 20"),
])
def test_cheap_checks_stop_the_run_before_any_model_work(tmp_path, capsys, monkeypatch, overrides, expected):
    monkeypatch.chdir(cli.Path(__file__).resolve().parents[1])
    (tmp_path / "empty.jsonl").write_text("")
    sets = [f"run_dir={tmp_path}/run"] + [o.format(d=tmp_path) for o in overrides]
    assert cli.main([*DEMO, *(a for s in sets for a in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert expected.format(d=tmp_path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "sft").exists()


def test_stats_out_is_the_directory_of_both_outputs(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "a", "chosen": "x", "rejected": "z"}\n')
    assert cli.main(["stats", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pairs.depth.png", "pairs.stats.json"]
    assert "breadth B     1 unique prompts" in capsys.readouterr().out
    assert "directory for FILE's .stats.json and .depth.png" in " ".join(subprocess.run(
        [sys.executable, "-m", "bpo_jax.main", "--help"], capture_output=True, text=True, check=True).stdout.split())


def test_zero_size_model_init_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(cli.Path(__file__).resolve().parents[1])
    assert cli.main([*DEMO, "--set", f"run_dir={tmp_path}", "--set", "model.init.intermediate_size=0"]) == 2
    assert capsys.readouterr().err == (
        "error: configs/demo.yaml:14: model.init: field 'intermediate_size' is 0; it must be positive\n")


ROOT = cli.Path(__file__).resolve().parents[1]
# Runs `python -m bpo_jax.main ARGS` as a user would (including its one re-execution on CPU hosts),
# then reports which heavy libraries the process had imported when it ended.
IMPORTS_AT_EXIT = """
import runpy, sys
sys.argv = ["bpo_jax.main", *sys.argv[1:]]
try:
    runpy.run_module("bpo_jax.main", run_name="__main__", alter_sys=True)
except SystemExit as e:
    sys.stderr.write(f"exit {e.code}\\n")
sys.stderr.write("heavy: " + " ".join(m for m in ("jax", "flax", "optax", "orbax") if m in sys.modules) + "\\n")
"""


def cli_run(args: list[str]) -> tuple[str, str, str]:
    """(the error line, the exit line, the heavy modules imported) of one CLI run in a fresh process."""
    done = subprocess.run([sys.executable, "-c", IMPORTS_AT_EXIT, *args], capture_output=True, text=True, cwd=ROOT)
    *error, exit_line, heavy = done.stderr.splitlines()
    return "\n".join(error), exit_line, heavy.removeprefix("heavy:").strip()


DEMO_TEXT = (ROOT / "configs" / "demo.yaml").read_text()


@pytest.mark.parametrize("old, new, key", [
    ("seed: 0", "sede: 0", "sede: unknown key; did you mean seed?"),
    ("seed: 0", "seed: abc", "seed: expected int, got str 'abc'"),
    ("prompts: bpo_jax/assets/demo_sort/prompts.jsonl", "prompts: no/such.jsonl", "data.prompts: file not found"),
    ("max_length: 32", "max_length: -5", "data.max_length: must be > 0, got -5"),
    ("loss_type: sigmoid", "loss_type: sigmod", "train.loss_type: 'sigmod' is not one of"),
])
def test_config_errors_are_reported_without_importing_jax(tmp_path, old, new, key):
    config = tmp_path / "bad.yaml"
    config.write_text(DEMO_TEXT.replace(old, new, 1))
    line = DEMO_TEXT[: DEMO_TEXT.index(old)].count("\n") + 1
    error, exit_line, heavy = cli_run(["--config", str(config)])
    assert error.startswith(f"error: {config}:{line}: {key}") and "\n" not in error, error
    assert (exit_line, heavy) == ("exit 2", "")


@pytest.mark.parametrize("command, text, expected", [
    ([], "run_dir: x\nmodel: {path: x\n  bad: [\n", "{f}:3: invalid YAML"),
    ([], None, "{f}: cannot read config file"),
    (["study"], "name: [\n", "{f}: invalid YAML"),
])
def test_unreadable_configs_are_reported_without_importing_jax(tmp_path, command, text, expected):
    config = tmp_path / "bad.yaml"
    if text is not None:
        config.write_text(text)
    error, exit_line, heavy = cli_run([*command, "--config", str(config)])
    assert error.startswith("error: " + expected.format(f=config)) and (exit_line, heavy) == ("exit 2", ""), error


def test_mesh_against_devices_is_checked_with_jax_after_the_cheap_checks():
    """The control for the tests above: the device count needs JAX, and the probe sees it loaded."""
    error, exit_line, heavy = cli_run(["--config", "configs/demo.yaml", "--set", "mesh.data=3"])
    assert error.startswith("error: configs/demo.yaml") and "mesh" in error and exit_line == "exit 2"
    assert heavy.split()[:2] == ["jax", "flax"]
