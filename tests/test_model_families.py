"""Sliding windows, Qwen3, Gemma 3 and multi-label heads against transformers (committed fixtures).

The fixtures (tests/fixtures/make_fixtures.py, transformers 5.24) have windows of 4-6 tokens and
12-token batches, so every comparison here reaches past the window. test_models_hf.py holds the
plain logits / KV-cache / export parity of the same fixtures; this module adds what only windows
and new families need: that the window really changes the logits, packed rows, the sampler's
greedy decode against transformers generate, the config fields that are refused, and the
trainer, LoRA, sharding and gradient features running unchanged on Qwen3 and Gemma 3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bpo_jax.config import LoraSection, OptimSection, TrainSection
from bpo_jax.gradients import FeatureSettings, GradientFeaturizer
from bpo_jax.models.config import ModelConfigError
from bpo_jax.models.hf import load_hf_model, save_hf_model
from bpo_jax.models.llama import Linear
from bpo_jax.models.lora import add_lora
from bpo_jax.rewards import RewardError, score_tokens
from bpo_jax.sampling import DecodeSpec, decode_batch, default_mesh
from bpo_jax.sharding import make_mesh, param_partition_spec, shard_model
from bpo_jax.train import DPOTrainer
from test_gradients import dense_matrix, make_batch, normalized, per_pair_grads
from test_models_hf import FIXTURES, forward, hf_model, real_token_diff, reference, rewrite_config
from test_train import first_batch, rule_pairs, run_steps, train_config

TOL = 1e-4
WINDOWED = ["mistral_window", "qwen2_window", "qwen3", "gemma3"]


def without_windows(name: str, tmp_path: Path):
    """The fixture loaded with a window longer than any sequence (config.json edited; Gemma's
    local layers keep their own rope base)."""
    directory = Path(shutil.copytree(FIXTURES / name, tmp_path / name))
    rewrite_config(directory, lambda cfg: cfg.update(sliding_window=4096))
    return load_hf_model(directory)


@pytest.mark.parametrize("name", WINDOWED)
def test_window_changes_logits_past_it(name, tmp_path):
    """Without the window the model matches transformers only on tokens the window does not cut:
    so the parity tests really test the window (and a window ignored on import would fail)."""
    ref = reference(name)
    ids, mask = ref["right_input_ids"], ref["right_attention_mask"]
    window = json.loads((FIXTURES / name / "config.json").read_text())["sliding_window"]
    logits = np.asarray(forward(without_windows(name, tmp_path), ids, mask))
    inside = mask * (np.arange(ids.shape[1]) < window)
    assert real_token_diff(logits, ref["right_logits"], inside) <= TOL
    past = mask * (np.arange(ids.shape[1]) >= window)
    assert real_token_diff(logits, ref["right_logits"], past) > 0.05


@pytest.mark.parametrize("name", WINDOWED)
def test_packed_row_matches_transformers(name):
    """The right-padded batch's rows packed into one row (segments 1..4, positions restarting at
    0) give each token transformers' logits of the unpacked row: windows count positions inside
    a segment, never reach into the previous example."""
    ref = reference(name)
    ids, mask = ref["right_input_ids"], ref["right_attention_mask"]
    lengths = mask.sum(axis=1)
    packed = np.concatenate([ids[r, :n] for r, n in enumerate(lengths)])[None]
    segments = np.concatenate([np.full(n, r + 1) for r, n in enumerate(lengths)])[None].astype(np.int32)
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    logits = np.asarray(forward(hf_model(name), packed, np.ones_like(packed), positions, segments))[0]
    want = np.concatenate([ref["right_logits"][r, :n] for r, n in enumerate(lengths)])
    np.testing.assert_allclose(logits, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", WINDOWED)
def test_sampler_greedy_decode_equals_transformers_generate(name):
    """bpo_jax's sampler (KV cache, temperature 0) emits transformers' greedy tokens for the
    left-padded prompts, 8 tokens each: past the window of the windowed fixtures."""
    ref = reference(name)
    prompt, prompt_mask, want = ref["greedy_prompt_ids"], ref["greedy_prompt_mask"], ref["greedy_ids"]
    spec = DecodeSpec(max_new_tokens=want.shape[1], temperature=0.0, top_k=0, top_p=1.0, stop_ids=())
    b = prompt.shape[0]
    out = decode_batch(hf_model(name), prompt, prompt_mask, np.arange(b), np.zeros(b), np.ones(b, bool), 0, spec, default_mesh())
    np.testing.assert_array_equal(out.tokens, want)


def test_mistral_export_keeps_a_null_window(tmp_path):
    """A window of None is written as null: a missing key would mean 4096 to transformers."""
    directory = Path(shutil.copytree(FIXTURES / "mistral_window", tmp_path / "src"))
    rewrite_config(directory, lambda c: c.update(sliding_window=None))
    model = load_hf_model(directory)
    assert model.config.layer_types is None
    cfg = json.loads((save_hf_model(model, tmp_path / "out") / "config.json").read_text())
    assert "sliding_window" in cfg and cfg["sliding_window"] is None
    # ...and a config without the key gets transformers' default window.
    rewrite_config(directory, lambda c: c.pop("sliding_window"))
    assert load_hf_model(directory).config.sliding_window == 4096


@pytest.mark.parametrize("name", ["qwen2_window", "qwen3", "gemma3", "qwen3_reward"])
def test_export_writes_what_transformers_reads(name, tmp_path):
    """The family's own keys survive export: windows, layer types, Gemma's rope bases and
    activation, label names."""
    original = json.loads((FIXTURES / name / "config.json").read_text())
    exported = json.loads((save_hf_model(hf_model(name), tmp_path / "out") / "config.json").read_text())
    keys = {"sliding_window", "layer_types", "use_sliding_window", "hidden_activation",
            "query_pre_attn_scalar", "head_dim", "id2label", "tie_word_embeddings"} & original.keys()
    for key in keys:
        assert exported[key] == original[key], key
    if name == "gemma3":
        rope = original["rope_parameters"]
        assert exported["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
        assert exported["rope_theta"] == rope["full_attention"]["rope_theta"]
        assert exported["rope_scaling"] == {"factor": 2.0, "rope_type": "linear"}


# -- what is refused, with the field that asks for it ---------------------------------------------


@pytest.mark.parametrize(
    "fixture,edit,field",
    [
        ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("gemma3", {"architectures": ["Gemma2ForCausalLM"]}, "architectures"),
        ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation"),
        ("gemma3", {"sliding_window": None}, "sliding_window"),
        ("gemma3", {"layer_types": ["full_attention"]}, "layer_types"),
        ("gemma3", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
        ("qwen3", {"sliding_window": 0}, "sliding_window"),
        ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
         "rope_parameters.sliding_attention"),
        ("qwen3_reward", {"num_labels": 2}, "num_labels"),
        ("qwen3_reward", {"id2label": {"0": "a", "2": "b"}}, "id2label"),
    ],
)
def test_unsupported_config_is_refused(tmp_path, fixture, edit, field):
    directory = Path(shutil.copytree(FIXTURES / fixture, tmp_path / fixture))
    rewrite_config(directory, lambda c: c.update(edit))
    with pytest.raises(ModelConfigError) as info:
        load_hf_model(directory)
    message = str(info.value)
    assert f"'{field}'" in message and str(directory / "config.json") in message and "\n" not in message, message


# -- multi-label reward heads ----------------------------------------------------------------------


def reward_rows(name: str) -> list[list[int]]:
    ref = reference(name)
    return [list(row[m.astype(bool)]) for row, m in zip(ref["right_input_ids"], ref["right_attention_mask"])]


@pytest.mark.parametrize("label,column", [("harmlessness", 1), (2, 2), ("helpfulness", 0)])
def test_reward_label_picks_the_transformers_score(label, column):
    """reward.label (an id2label name or an index) picks that output of transformers' pooled scores."""
    scores = score_tokens(hf_model("qwen3_reward"), reward_rows("qwen3_reward"), batch_size=4, label=label)
    np.testing.assert_allclose(scores, reference("qwen3_reward")["scores"][:, column], atol=TOL, rtol=0)


@pytest.mark.parametrize("label", [None, "safety", 3, -1])
def test_reward_label_must_pick_one_of_several(label):
    with pytest.raises(RewardError) as info:
        score_tokens(hf_model("qwen3_reward"), [[3, 4]], batch_size=1, label=label)
    message = str(info.value)
    assert message.startswith("reward.label:") and "['helpfulness', 'harmlessness', 'honesty']" in message, message


# -- the rest of bpo_jax, unchanged, on the new families -------------------------------------------


def lora_fixture(name: str):
    """The fixture with rank-4 LoRA on the default targets, B moved off zero (so A has gradients)."""
    model = add_lora(load_hf_model(FIXTURES / name), LoraSection(rank=4), seed=1)
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if isinstance(m, Linear) and m.lora_b is not None:
            m.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(100 + i), m.lora_b.shape))
    return model


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_sharded_forward_lora_targets_and_partition_rules(name):
    """On a (2, 2, 2) mesh the partition rules split every projection and embedding (norms,
    q/k norms included, stay whole) and logits still match transformers; LoRA finds all 7
    projections of every layer."""
    mesh = make_mesh((2, 2, 2))
    model = shard_model(load_hf_model(FIXTURES / name), mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = "/".join(map(str, path))
        spec = param_partition_spec(path, var.shape, mesh)
        assert all(axis is None for axis in spec) == key.endswith("norm/scale"), (key, spec)
    ref = reference(name)
    logits = forward(model, ref["right_input_ids"], ref["right_attention_mask"])
    assert real_token_diff(logits, ref["right_logits"], ref["right_attention_mask"]) <= TOL
    adapted = [p for p, m in nnx.iter_modules(lora_fixture(name)) if isinstance(m, Linear) and m.lora_a is not None]
    assert len(adapted) == 7 * model.config.num_hidden_layers


def test_gradient_features_equal_per_pair_grads():
    """BPO's vmap(grad) features of Gemma 3 on windowed 14-token pairs equal per-pair jax.grad
    times the dense projection (test_gradients.py's reference, on this family's model)."""
    model = lora_fixture("gemma3")
    batch = make_batch(3)
    settings = FeatureSettings(proj_dim=32, seed=3, chunk_size=100, beta=0.2)
    featurizer = GradientFeaturizer(model, settings, micro_batch=3)
    got = featurizer(batch)
    g = per_pair_grads(model, batch, TrainSection(beta=0.2))
    want = normalized(g @ dense_matrix(featurizer.leaf_sizes, 100, 32, 3, "rademacher"))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_dpo_lora_training_on_gemma3_lowers_the_loss():
    """The sharded DPO step with LoRA (frozen-copy reference) learns a simple preference."""
    trainer = DPOTrainer(lora_fixture("gemma3"), train_config(optim=OptimSection(learning_rate=1e-2, schedule="constant")),
                         make_mesh((2, 2, 2)), total_steps=6)
    _, history = run_steps(trainer, [first_batch(rule_pairs(8, 0))] * 6)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05, [h["loss"] for h in history]
