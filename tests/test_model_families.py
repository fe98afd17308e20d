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

import numpy as np
import pytest

from bpo_jax.models.config import ModelConfigError
from bpo_jax.models.hf import load_hf_model, save_hf_model
from bpo_jax.rewards import RewardError, score_tokens
from bpo_jax.sampling import DecodeSpec, decode_batch, default_mesh
from test_models_hf import FIXTURES, forward, hf_model, real_token_diff, reference, rewrite_config

TOL = 1e-4
WINDOWED = ["mistral_window", "qwen2_window", "qwen3", "gemma3"]
FAMILIES = WINDOWED + ["qwen2_tied", "llama_gqa"]


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


@pytest.mark.parametrize("name", FAMILIES)
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
