"""Config loading, overrides and up-front validation: every error names file:line and the dotted key."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from bpo_jax.config import (
    ConfigError,
    ModelSection,
    RunConfig,
    config_from_dict,
    config_reference_markdown,
    config_to_dict,
    field_help,
    load_config,
    save_config,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_MODEL = REPO / "tests" / "fixtures" / "hf" / "llama_gqa"
INIT = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line of `path` that contains `needle`."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


BASE = f"""
model:
  path: {FIXTURE_MODEL}
reward:
  function: my_rewards:score
train:
  batch_size: 8
"""


def test_load_yaml_defaults_types_and_overrides(tmp_path):
    path = write(
        tmp_path,
        BASE
        + """
  beta: 1            # an int where a float is declared
  optim:
    schedule: linear
lora:
  rank: 4
  targets: [q_proj, v_proj]
""",
    )
    config = load_config(
        path,
        [
            "train.optim.learning_rate=1e-6",  # exponent without a dot: YAML 1.1 would read a string
            "data.length_buckets=[128, 256, 512]",
            "sft.enabled=true",
            "sft.data=" + str(path),  # any existing file
            "mesh.fsdp=2",
            "distributed.coordinator_address=",  # empty value: null
        ],
        num_devices=2,
    )
    assert config.model.path == str(FIXTURE_MODEL)
    assert config.train.beta == 1.0 and type(config.train.beta) is float
    assert config.train.optim.learning_rate == 1e-6 and type(config.train.optim.learning_rate) is float
    assert config.train.optim.schedule == "linear"
    assert config.train.optim.b2 == 0.999  # untouched default inside a partly given section
    assert config.data.length_buckets == (128, 256, 512)
    assert config.lora.targets == ("q_proj", "v_proj")
    assert config.sft.enabled is True and config.mesh.fsdp == 2
    assert config.distributed.coordinator_address is None
    assert config.sample == RunConfig().sample  # a section absent from the file keeps its defaults


def test_yaml_1_2_booleans_off_is_a_string(tmp_path):
    """`off`/`no` are strings (YAML 1.1 would make `depth_allocator: off` the boolean False)."""
    path = write(tmp_path, BASE + "bpo:\n  depth_allocator: off\n  breadth_enabled: true\n")
    config = load_config(path, ["data.skip_bad_rows=false"])
    assert config.bpo.depth_allocator == "off" and config.bpo.breadth_enabled is True
    assert config.data.skip_bad_rows is False
    overridden = load_config(write(tmp_path, BASE, "plain.yaml"), ["bpo.depth_allocator=off"])
    assert overridden.bpo.depth_allocator == "off"


def test_override_replaces_file_value_and_later_override_wins(tmp_path):
    path = write(tmp_path, BASE + "  beta: 0.3\n")
    config = load_config(path, ["train.beta=0.5", "train.beta=0.7"])
    assert config.train.beta == 0.7


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    path = write(conf_dir, BASE + "data:\n  prompts: prompts.jsonl\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).data.prompts == "prompts.jsonl"
    monkeypatch.chdir(conf_dir)  # the same relative path no longer exists from here
    with pytest.raises(ConfigError, match="data.prompts: file not found: prompts.jsonl"):
        load_config(path)


# (extra YAML appended to BASE, overrides, dotted key in the error, YAML text on the reported line
#  or None for "no line: the error is about an override", expected fragment of the message)
ERROR_CASES = [
    ("  bta: 0.1\n", [], "train.bta", "bta:", "did you mean train.beta?"),
    ("  learning_rate: 1.0e-5\n", [], "train.learning_rate", "learning_rate:", "did you mean train.optim.learning_rate?"),
    ("trian:\n  beta: 1\n", [], "trian", "trian:", "did you mean train?"),
    ("  batch_sz: 4\n", [], "train.batch_sz", "batch_sz:", "did you mean train.batch_size?"),
    ("  grad_accum_steps: eight\n", [], "train.grad_accum_steps", "grad_accum_steps:", "expected int, got str 'eight'"),
    ("  grad_accum_steps: 2.5\n", [], "train.grad_accum_steps", "grad_accum_steps:", "expected int, got float 2.5"),
    ("  grad_accum_steps: true\n", [], "train.grad_accum_steps", "grad_accum_steps:", "expected int, got bool True"),
    ("  beta: .nan\n", [], "train.beta", "beta:", "expected float"),
    ("  optim: 5\n", [], "train.optim", "optim:", "must be a mapping"),
    ("lora:\n  targets: q_proj\n", [], "lora.targets", "targets:", "expected tuple[str, ...], got str 'q_proj'"),
    ("lora:\n  targets: [q_proj, 3]\n", [], "lora.targets", "targets:", "expected tuple[str, ...]"),
    ("", ["reward.gym_config=[1, 2]"], "reward.gym_config", None, "expected dict | None"),  # (BASE has a reward: section; a second one is a duplicate key)
    ("  loss_type: sigmod\n", [], "train.loss_type", "loss_type:", "did you mean 'sigmoid'?"),
    ("model2: {}\n", [], "model2", "model2:", "did you mean model?"),
    ("pairs:\n  strategy: mu-2s/max\n", [], "pairs.strategy", "strategy:", "did you mean max/mu-2s?"),
    ("pairs:\n  strategy: best/worst\n", [], "pairs.strategy", "strategy:", "unknown pair strategy 'best/worst'"),
    ("bpo:\n  candidate_strategies: [max/min, min/max]\n", [], "bpo.candidate_strategies", "candidate_strategies:", "above"),
    ("bpo:\n  embedder: bert\n", [], "bpo.embedder", "embedder:", "policy, tfidf, minilm"),
    ("bpo:\n  trainable: 'layers/(1'\n", [], "bpo.trainable", "trainable:", "not a valid regular expression"),
    ("  beta: 0\n", [], "train.beta", "beta:", "must be > 0, got 0.0"),
    ("  label_smoothing: 0.5\n", [], "train.label_smoothing", "label_smoothing:", "must be in [0, 0.5)"),
    ("  label_smoothing: 0.1\n  loss_type: ipo\n", [], "train.label_smoothing", "label_smoothing:", "not loss_type 'ipo'"),
    ("  grad_accum_steps: 3\n", [], "train.grad_accum_steps", "grad_accum_steps:", "3 does not divide train.batch_size 8"),
    ("sample:\n  top_p: 0\n", [], "sample.top_p", "top_p:", "must be in (0, 1]"),
    ("sample:\n  n: 1\n", [], "sample.n", "n: 1", "must be >= 2"),
    ("  reference: lora_off\n", [], "train.reference", "reference:", "needs lora.rank > 0"),
    ("  reference: none\n", [], "train.reference", "reference:", "not loss_type 'sigmoid'"),
    ("data:\n  max_prompt_length: 600\n", [], "data.max_prompt_length", "max_prompt_length:", "below data.max_length (512)"),
    ("data:\n  length_buckets: [256, 128]\n", [], "data.length_buckets", "length_buckets:", "strictly increasing"),
    ("data:\n  length_buckets: [128, 256]\n", [], "data.length_buckets", "length_buckets:", "must hold data.max_length (512)"),
    ("sft:\n  enabled: true\n", [], "sft.data", "sft:", "needs a demonstrations file"),
    ("mesh:\n  data: -1\n  fsdp: -1\n", [], "mesh", "mesh:", "at most one axis may be -1"),
    ("mesh:\n  tensor: 0\n", [], "mesh", "mesh:", "sizes must be positive"),
    ("", ["mesh.fsdp=-1"], "mesh", None, "at most one axis may be -1"),
    ("distributed:\n  num_processes: 2\n  process_id: 2\n", [], "distributed.process_id", "process_id:", "below"),
    ("data:\n  prompts: /nonexistent/prompts.jsonl\n", [], "data.prompts", "prompts:", "file not found"),
    ("", ["train.beta=-1"], "train.beta", None, "must be > 0"),
    ("", ["train.optim.learnig_rate=1e-5"], "train.optim.learnig_rate", None, "did you mean train.optim.learning_rate?"),
    ("", ["train.optim.lr=1e-5"], "train.optim.lr", None, "valid keys here: learning_rate, schedule, warmup_steps"),
    ("", ["train.beta"], "train.beta", None, "must look like section.key=value"),
    ("", ["train.batch_size.x=1"], "train.batch_size", None, "is a value, not a section"),
]


@pytest.mark.parametrize("extra, overrides, key, line_text, fragment", ERROR_CASES, ids=[c[2] + ":" + c[4][:20] for c in ERROR_CASES])
def test_error_names_file_line_key(tmp_path, extra, overrides, key, line_text, fragment):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert info.value.key == key
    assert f": {key}: " in message
    assert fragment in message
    if line_text is None:
        assert message.startswith(f"{path} (--set {overrides[0]}): ")
    else:
        # The reported line holds the key (or, for a default that was never set, its section).
        assert message.startswith(f"{path}:{line_of(path, line_text)}: "), message


@pytest.mark.parametrize(
    "model_yaml, fragment",
    [
        ("model:\n  path: /nonexistent/model\n", "directory not found: /nonexistent/model"),
        ("model:\n  path: {empty}\n", "no config.json"),
        ("model:\n  gguf: /nonexistent/m.gguf\n", "file not found: /nonexistent/m.gguf"),
        ("model:\n  init: {init}\n  path: {fixture}\n", "exactly one of model.path, model.gguf, model.init"),
        ("model:\n  init: {{architectures: [GPT2LMHeadModel]}}\n", "model.init: field 'architectures'"),
        ("run_dir: x\n", "got none"),
        ("model:\n  path: {fixture}\n  tokenizer: {empty}\n", "no tokenizer.json"),
    ],
)
def test_model_source_errors(tmp_path, model_yaml, fragment):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = write(tmp_path, model_yaml.format(empty=empty, fixture=FIXTURE_MODEL, init=INIT))
    with pytest.raises(ConfigError, match=re.escape(fragment)) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    assert info.value.key.startswith("model")


def test_reward_needed_only_when_responses_get_scored(tmp_path):
    prompts = write(tmp_path, '{"prompt": "x"}\n', "prompts.jsonl")
    path = write(tmp_path, BASE + f"data:\n  prompts: {prompts}\n")
    with pytest.raises(ConfigError, match=r"reward.function: kind 'rule' needs a 'module:function' name, got None"):
        load_config(path, ["reward.function="])
    with pytest.raises(ConfigError, match=r"reward.function: .* got 'my_rewards.score'"):
        load_config(path, ["reward.function=my_rewards.score"])
    assert load_config(path).reward.function == "my_rewards:score"
    with pytest.raises(ConfigError, match="reward.model_path: kind 'model' needs"):
        load_config(path, ["reward.kind=model"])
    with pytest.raises(ConfigError, match="reward.gym_task"):
        load_config(path, ["reward.kind=gym"])
    with pytest.raises(ConfigError, match="reward.kind: 'precomputed' reads rewards from data.scored"):
        load_config(path, ["reward.kind=precomputed"])
    # Entering at the train stage with existing pairs: no scoring, so the reward section is moot.
    config = load_config(path, [f"data.pairs={prompts}", "reward.function="])
    assert config.reward.function is None


def test_mesh_checked_against_device_count(tmp_path):
    path = write(tmp_path, BASE + "mesh:\n  fsdp: 4\n")
    assert load_config(path, num_devices=8).mesh.fsdp == 4  # data = -1 takes the remaining 2
    with pytest.raises(ConfigError, match=r":\d+: mesh: .*does not divide 6 devices"):
        load_config(path, num_devices=6)
    with pytest.raises(ConfigError, match="needs 8 devices, but 4 are available"):
        load_config(path, ["mesh.data=2"], num_devices=4)
    # batch 8 / grad_accum 2 = micro-batch 4 cannot split over data x fsdp = 2 x 4 = 8 shards.
    with pytest.raises(ConfigError, match=r"train.batch_size: a micro-batch of 4 pairs .* 8 batch shards"):
        load_config(path, ["train.grad_accum_steps=2"], num_devices=8)
    # Without a device count only the static shape is checked.
    assert load_config(path, ["train.grad_accum_steps=2"]).train.grad_accum_steps == 2


def test_yaml_syntax_and_top_level_errors(tmp_path):
    bad = write(tmp_path, "train:\n  beta: [1, 2\nlora: {}\n", "bad.yaml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}:\d+: invalid YAML"):
        load_config(bad)
    listed = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(listed))}: must be a mapping of sections"):
        load_config(listed)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_validate_without_a_file_names_only_the_key():
    config = RunConfig(model=ModelSection(init=dict(INIT)))
    validate(config)
    config.train.beta = -1.0
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert str(info.value) == "train.beta: must be > 0, got -1.0"


def test_save_config_round_trip(tmp_path):
    path = write(tmp_path, BASE + "lora:\n  rank: 8\n")
    config = load_config(path, ["train.optim.learning_rate=3e-7", "model.init=null"])
    out = tmp_path / "run" / "config.yaml"
    save_config(config, out)
    assert load_config(out) == config
    saved = yaml.safe_load(out.read_text())
    assert saved["lora"]["targets"] == list(config.lora.targets)  # plain YAML lists, no Python tags
    assert saved["train"]["optim"]["learning_rate"] == pytest.approx(3e-7)
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert config_from_dict(config_to_dict(config)) == config


def _leaf_keys(obj=None, prefix=""):
    """Dotted keys of every non-section field, walking a default RunConfig instance."""
    obj = RunConfig() if obj is None else obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_field_has_help_and_a_reference_row():
    helps = field_help()
    leaves = list(_leaf_keys())
    assert len(leaves) > 90
    missing = [k for k in leaves if not helps.get(k)]
    assert not missing, f"fields without a trailing # comment: {missing}"
    table = config_reference_markdown().splitlines()
    assert table[0] == "| section | key | type | default | description |"
    rows = table[2:]
    assert len(rows) == len(leaves)
    assert "| train.optim | `learning_rate` | `float` | `5e-06` | peak learning rate |" in rows
    assert "| model | `path` | `str \\| None` | `null` | " + helps["model.path"] + " |" in rows
    assert any(r.startswith("| bpo | `candidate_strategies` | `tuple[str, ...]` | `[\"max/mu-2s\", ") for r in rows)
    assert all(len(re.split(r"(?<!\\)\|", r)) == 7 for r in rows)  # five cells, inner pipes escaped


def _declared_devices(path: Path) -> int:
    match = re.search(r"^# devices: (\d+)$", path.read_text(), re.M)
    return int(match.group(1)) if match else 1


SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate_on_their_device_count(path):
    devices = _declared_devices(path)
    config = load_config(path, num_devices=devices, check_files=False)
    if devices > 1:
        # The declared count is a real constraint: half the devices must not fit the mesh.
        with pytest.raises(ConfigError, match="mesh"):
            load_config(path, num_devices=devices // 2, check_files=False)
    if "multihost" in path.name:
        assert config.distributed.enabled


def test_shipped_config_device_counts():
    declared = {p.name: _declared_devices(p) for p in SHIPPED}
    for name, count in {"gpu_single.yaml": 1, "tpu_v5e_8.yaml": 8, "tpu_v5p_64_multihost.yaml": 32}.items():
        assert declared.get(name) == count


def test_bpo_choices_are_the_ones_depth_implements():
    """config.py lists the choices without importing depth.py (NumPy-only); they must agree."""
    from bpo_jax import config, depth

    assert config.DEPTH_ALLOCATORS == depth.ALLOCATORS + ("off",)
    assert config.BASE_PAIRS == depth.BASE_PAIRS


def test_loss_types_are_the_ones_losses_implements():
    """config.py lists the loss types without importing losses.py (it loads JAX); they must agree."""
    from bpo_jax import config, losses

    assert config.LOSS_TYPES == losses.LOSS_TYPES


ACCELERATOR_CONFIGS = ("gpu_single.yaml", "tpu_v5e_8.yaml", "tpu_v5p_64_multihost.yaml")
MEASURE_SPEED = "#   python -m bench.run_all --size gpu\n"


def _for_an_accelerator(path: Path) -> bool:
    """Several devices or a 16-bit compute dtype: a config no CPU run uses."""
    return _declared_devices(path) > 1 or yaml.safe_load(path.read_text())["model"].get("dtype", "float32") != "float32"


def test_accelerator_configs_say_whether_their_speed_was_measured():
    """Each states its step time and MFU, or says plainly that they were not measured, with the
    command that measures them."""
    assert tuple(p.name for p in SHIPPED if _for_an_accelerator(p)) == ACCELERATOR_CONFIGS
    for name in ACCELERATOR_CONFIGS:
        text = (REPO / "configs" / name).read_text()
        header = text[: text.index("\nrun_dir:")]
        [speed] = [line for line in header.splitlines() if line.startswith("# Step time and MFU: ")]
        measured = re.search(r"\d m?s\b", speed) and re.search(r"\d%", speed)
        assert measured or speed.startswith("# Step time and MFU: NOT measured."), name
        assert MEASURE_SPEED in header, name
