"""The Llama-family model against Hugging Face transformers, through committed fixtures.

tests/fixtures/hf/<name>/ holds tiny random-weight models saved by transformers and its outputs
(reference.npz); the docstring of tests/fixtures/make_fixtures.py says how they were made. Nothing
here imports torch or transformers. Also: checkpoint export round trips, bf16 export, broken
checkpoints, KV-cache decoding.

Run as a script to write an export for the reverse check with transformers (any fixture name):
    .venv/bin/python tests/test_models_hf.py llama_gqa /tmp/export_llama_gqa
    /work/refvenv/bin/python tests/fixtures/make_fixtures.py --check-export /tmp/export_llama_gqa
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from bpo_jax.io_utils import atomic_open
from bpo_jax.models.config import ModelConfigError, rope_inverse_frequencies
from bpo_jax.models.hf import CheckpointError, load_hf_model, save_hf_model
from bpo_jax.models.llama import CausalLM

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
CAUSAL = ["llama_gqa", "qwen2_tied", "mistral", "mistral_window", "qwen2_window", "qwen3", "gemma3"]
REWARD = ["llama_reward", "qwen3_reward"]
ALL = CAUSAL + REWARD
TOL = 1e-4  # fp32 logits, max abs difference on real tokens


@functools.cache
def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference.npz") as f:
        return dict(f)


@functools.cache
def hf_model(name: str) -> CausalLM:
    """Fixture model loaded once per session (tests only read it)."""
    return load_hf_model(FIXTURES / name)


def compiled(method: Callable) -> Callable:
    """`method(model, *arrays)` under jit, the model's graph static. Tiny models: XLA's compile
    time dominates these tests (seconds per shape on CPU), so compile without backend optimization."""

    @functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
    def run(graphdef, state, *args):
        return method(nnx.merge(graphdef, state), *args)

    return lambda model, *args: run(*nnx.split(model), *args)


forward = compiled(CausalLM.__call__)
rewards = compiled(CausalLM.rewards)
cached_forward = compiled(CausalLM.forward_with_cache)


def real_token_diff(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    """Max abs difference over the real (mask != 0) tokens of [B, T, V] arrays."""
    return float(np.abs(np.asarray(got, np.float32) - want)[mask.astype(bool)].max())


def flat_params(model: CausalLM) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_bitwise_equal(a: CausalLM, b: CausalLM) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype and pa[path].shape == pb[path].shape, path
        assert pa[path].tobytes() == pb[path].tobytes(), f"{path} differs"


def copy_fixture(tmp_path: Path, name: str = "llama_gqa") -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def export_with_logits(name: str, directory: Path, **save_options) -> Path:
    """Export fixture `name` with save_hf_model and add bpo_logits.npz (its left-padded batch),
    the input of make_fixtures.py --check-export."""
    model = hf_model(name)
    ref = reference(name)
    side = "left" if "left_input_ids" in ref else "right"
    ids, mask = ref[f"{side}_input_ids"], ref[f"{side}_attention_mask"]
    save_hf_model(model, directory, **save_options)
    logits = np.asarray(forward(model, ids, mask), np.float32)
    with atomic_open(Path(directory) / "bpo_logits.npz", "wb") as f:
        np.savez(f, input_ids=ids, attention_mask=mask, logits=logits)
    return Path(directory)


# -- parity with transformers --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,side", [(n, s) for n in CAUSAL for s in ("right", "left")] + [(n, "right") for n in REWARD]
)
def test_logits_match_transformers(name, side):
    """Default positions (cumsum(mask) - 1) reproduce transformers on either padding side."""
    ref = reference(name)
    ids, mask = ref[f"{side}_input_ids"], ref[f"{side}_attention_mask"]
    logits = forward(hf_model(name), ids, mask)
    assert logits.shape == ref[f"{side}_logits"].shape
    diff = real_token_diff(logits, ref[f"{side}_logits"], mask)
    assert diff <= TOL, diff


@pytest.mark.parametrize("name,labels", [("llama_reward", 1), ("qwen3_reward", 3)])
def test_reward_scores_match_transformers(name, labels):
    """Pooled scores of every label; the multi-label head's size comes from id2label alone."""
    ref = reference(name)
    scores = rewards(hf_model(name), ref["right_input_ids"], ref["right_attention_mask"])
    assert scores.shape == ref["scores"].shape == (4, labels)
    np.testing.assert_allclose(np.asarray(scores), ref["scores"], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_rope_frequencies_match_transformers(name):
    ours = rope_inverse_frequencies(hf_model(name).config)
    np.testing.assert_allclose(np.asarray(ours), reference(name)["rope_inv_freq"], rtol=1e-6, atol=0)
    if "rope_local_inv_freq" in reference(name):  # Gemma 3's sliding layers: own base, unscaled
        local = rope_inverse_frequencies(hf_model(name).config, local=True)
        np.testing.assert_allclose(np.asarray(local), reference(name)["rope_local_inv_freq"], rtol=1e-6, atol=0)


def test_llama3_fixture_exercises_every_rope_band():
    """The llama3 fixture keeps some frequencies, smooths some and divides some by `factor`;
    otherwise the parity tests above would not test the scaling at all."""
    cfg = json.loads((FIXTURES / "llama_gqa" / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta")}
    d = cfg["head_dim"]
    plain = rope["rope_theta"] ** -(np.arange(0, d, 2) / d)
    ratio = reference("llama_gqa")["rope_inv_freq"] / plain
    kept = np.isclose(ratio, 1.0, rtol=1e-6)
    divided = np.isclose(ratio, 1 / rope["factor"], rtol=1e-6)
    assert kept.any() and divided.any() and (~kept & ~divided).any(), ratio


def test_transformers4_config_layout(tmp_path):
    """Checkpoints written by transformers 4 (most of the Hub) keep rope_theta and rope_scaling at
    the top level instead of transformers 5's rope_parameters; both must load the same."""
    directory = copy_fixture(tmp_path, "llama_gqa")
    cfg = json.loads((directory / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (directory / "config.json").write_text(json.dumps(cfg))
    ref = reference("llama_gqa")
    logits = forward(load_hf_model(directory), ref["left_input_ids"], ref["left_attention_mask"])
    diff = real_token_diff(logits, ref["left_logits"], ref["left_attention_mask"])
    assert diff <= TOL, diff


@pytest.mark.parametrize("name", CAUSAL)
def test_teacher_forced_argmax_is_transformers_greedy(name):
    """Fed prompt + transformers' greedy tokens, the model's argmax at each step is the next one."""
    ref = reference(name)
    new = ref["greedy_ids"]
    ids = np.concatenate([ref["greedy_prompt_ids"], new], axis=1)
    mask = np.concatenate([ref["greedy_prompt_mask"], np.ones_like(new)], axis=1)
    logits = forward(hf_model(name), ids, mask)
    p = ref["greedy_prompt_ids"].shape[1]
    np.testing.assert_array_equal(np.argmax(np.asarray(logits)[:, p - 1 : -1], axis=-1), new)


# -- KV cache ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL)
def test_kv_cache_decoding_matches_full_forward(name):
    """Prefill a left-padded batch, then decode one token at a time; every step's logits equal a
    plain forward over the prefix (the same row with everything after the step masked out)."""
    model, ref = hf_model(name), reference(name)
    prompt, prompt_mask, new = ref["greedy_prompt_ids"], ref["greedy_prompt_mask"], ref["greedy_ids"]
    b, p = prompt.shape
    total = p + new.shape[1]
    ids = np.concatenate([prompt, new], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)  # covers every cache slot
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)

    def prefix_forward(t: int) -> np.ndarray:
        """Logits of a plain forward that sees only tokens 0..t of each row."""
        return np.asarray(forward(model, ids, mask * (np.arange(total) <= t)))

    cache = model.init_cache(b, total)
    logits, cache = cached_forward(model, prompt, positions[:, :p], mask, cache, jnp.asarray(0))
    prefill_diff = real_token_diff(logits, prefix_forward(p - 1)[:, :p], prompt_mask)
    assert prefill_diff <= TOL, prefill_diff
    for t in range(p, total):
        step, cache = cached_forward(model, ids[:, t : t + 1], positions[:, t : t + 1], mask, cache, jnp.asarray(t))
        np.testing.assert_allclose(
            np.asarray(step)[:, 0], prefix_forward(t)[:, t], atol=TOL, rtol=0, err_msg=f"decode step at slot {t}"
        )


# -- export --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_export_round_trip_is_bitwise(name, tmp_path):
    """import -> save_hf_model -> import gives the same bits, and the exported tensors are the
    very tensors transformers wrote (same names, so a tied head is not written twice)."""
    model = hf_model(name)
    out = export_with_logits(name, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["bpo_logits.npz", "config.json", "model.safetensors"]
    original = load_file(FIXTURES / name / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()
    for key, array in original.items():
        assert exported[key].dtype == array.dtype and exported[key].tobytes() == array.tobytes(), key
    again = load_hf_model(out)
    assert again.config == model.config
    assert_bitwise_equal(again, model)
    # What make_fixtures.py --check-export compares against transformers.
    with np.load(out / "bpo_logits.npz") as saved:
        side = "left" if name in CAUSAL else "right"
        diff = real_token_diff(saved["logits"], reference(name)[f"{side}_logits"], saved["attention_mask"])
        assert diff <= TOL, diff


def test_sharded_export_round_trip(tmp_path):
    model = hf_model("llama_gqa")
    limit = 40_000
    out = save_hf_model(model, tmp_path / "export", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert not (out / "model.safetensors").exists() and len(shards) > 2
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    total = 0
    for shard in shards:
        tensors = load_file(shard)
        size = sum(a.nbytes for a in tensors.values())
        assert size <= limit or len(tensors) == 1, shard.name  # only a lone oversized tensor may exceed
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        total += size
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"].keys() == load_file(FIXTURES / "llama_gqa" / "model.safetensors").keys()
    assert_bitwise_equal(load_hf_model(out), model)


def test_bfloat16_export_and_import(tmp_path):
    model = hf_model("qwen2_tied")
    out = save_hf_model(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    fp32 = flat_params(model)
    loaded = flat_params(load_hf_model(out, param_dtype="bfloat16"))
    for path, value in fp32.items():
        got = loaded[path]
        assert got.dtype == ml_dtypes.bfloat16, path
        # Exactly the round-to-nearest-even bf16 value: within half a bf16 ulp (2^-8 relative).
        assert got.tobytes() == value.astype(ml_dtypes.bfloat16).tobytes(), path
        assert np.all(np.abs(got.astype(np.float32) - value) <= 2.0**-8 * np.abs(value)), path
    # An fp32 load of the bf16 file holds the same (exactly representable) values.
    widened = flat_params(load_hf_model(out, param_dtype="float32"))
    for path, value in loaded.items():
        assert widened[path].dtype == np.float32 and np.array_equal(widened[path], value.astype(np.float32)), path
    # bf16 weights and compute still track transformers' fp32 logits: measured ~2.7% of the
    # largest logit on these fixtures; a dtype mix-up would be off by the logits' own scale.
    ref = reference("qwen2_tied")
    logits = forward(load_hf_model(out, param_dtype="bfloat16", dtype="bfloat16"),
                     ref["right_input_ids"], ref["right_attention_mask"])
    assert logits.dtype == jnp.bfloat16
    diff = real_token_diff(logits, ref["right_logits"], ref["right_attention_mask"])
    assert diff <= 0.05 * np.abs(ref["right_logits"]).max(), diff


# -- broken checkpoints: one clear, single-line error naming the file and what is wrong --------


def rewrite_config(directory: Path, edit) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    edit(cfg)
    (directory / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _unknown_architecture(d: Path) -> None:
    rewrite_config(d, lambda c: c.update(architectures=["GPT2LMHeadModel"]))


def _invalid_json(d: Path) -> None:
    (d / "config.json").write_text((d / "config.json").read_text()[:-20])


def _missing_config(d: Path) -> None:
    (d / "config.json").unlink()


def _missing_safetensors(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _missing_tensor(d: Path) -> None:
    rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _wrong_shape(d: Path) -> None:
    rewrite_tensors(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 32), np.float32)}))


def _sharded(d: Path) -> dict:
    """Re-save the fixture as two shards with an index; returns the index."""
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, d / fname, metadata={"format": "pt"})
    return {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}


def _missing_tensor_in_index(d: Path) -> None:
    index = _sharded(d)
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _missing_shard_file(d: Path) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(_sharded(d)))
    (d / "model-00002-of-00002.safetensors").unlink()


def _invalid_index(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ')


@pytest.mark.parametrize(
    "breakage,error,file,needles",
    [
        pytest.param(_unknown_architecture, ModelConfigError, "config.json", ["architectures", "GPT2LMHeadModel"],
                     id="unknown_architecture"),
        pytest.param(_invalid_json, ModelConfigError, "config.json", ["invalid JSON"], id="invalid_json"),
        pytest.param(_missing_config, FileNotFoundError, "config.json", ["not found"], id="missing_config"),
        pytest.param(_missing_safetensors, FileNotFoundError, "", ["model.safetensors"], id="missing_safetensors"),
        pytest.param(_missing_tensor, CheckpointError, "model.safetensors",
                     ["missing", "model.layers.1.mlp.up_proj.weight"], id="missing_tensor"),
        pytest.param(_missing_tensor_in_index, CheckpointError, "model.safetensors.index.json",
                     ["missing", "model.layers.1.mlp.up_proj.weight"], id="missing_tensor_in_index"),
        pytest.param(_missing_shard_file, CheckpointError, "model.safetensors.index.json",
                     ["weight_map", "missing file(s) model-00002-of-00002.safetensors"], id="missing_shard_file"),
        pytest.param(_wrong_shape, CheckpointError, "model.safetensors",
                     ["model.layers.0.self_attn.k_proj.weight", "(48, 32)", "(32, 48)"], id="wrong_shape"),
        pytest.param(_invalid_index, CheckpointError, "model.safetensors.index.json", ["weight_map"],
                     id="invalid_index"),
    ],
)
def test_broken_checkpoint_errors(tmp_path, breakage, error, file, needles):
    directory = copy_fixture(tmp_path)
    breakage(directory)
    with pytest.raises(error) as info:
        load_hf_model(directory)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(directory / file).rstrip("/") in message, message
    for needle in needles:
        assert needle in message, message


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ALL:
        sys.exit(f"usage: python tests/test_models_hf.py {{{','.join(ALL)}}} OUT_DIR")
    out = export_with_logits(argv[0], Path(argv[1]))
    print(f"wrote {out} (config.json, safetensors, bpo_logits.npz)")


if __name__ == "__main__":
    main(sys.argv[1:])
