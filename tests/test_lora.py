"""LoRA adapters: the forward they add, merging them away, and which projections get them.

The expectation is built independently: a second, plain model whose targeted kernels are set in
NumPy to W + A B * alpha / rank must give the adapted model's logits.
"""

from __future__ import annotations

import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx

from bpo_jax.config import LoraSection
from bpo_jax.models import ModelConfig, add_lora, init_model, merge_lora
from bpo_jax.models.llama import Linear
from bpo_jax.models.lora import adapters_off_graphdef

TINY = ModelConfig(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=4,
)
IDS = np.random.default_rng(0).integers(0, 32, (2, 7)).astype(np.int32)
RANK, ALPHA = 4, 8.0


def logits(model) -> np.ndarray:
    return np.asarray(model(IDS), np.float64)


def adapted_model(targets=LoraSection.targets):
    """A LoRA model whose B matrices are random (fresh ones are zero and would hide bugs)."""
    model = add_lora(init_model(TINY, seed=0), LoraSection(rank=RANK, alpha=ALPHA, targets=tuple(targets)), seed=3)
    rng = np.random.default_rng(1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.lora_b is not None:
            module.lora_b.set_value(rng.normal(0, 0.3, module.lora_b.shape).astype(np.float32))
    return model


def adapted_paths(model) -> set[str]:
    return {"/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora_a is not None}


def test_adapter_adds_x_a_b_times_alpha_over_rank():
    model = adapted_model()
    expected = init_model(TINY, seed=0)  # same base weights, no adapters
    plain = dict(nnx.iter_modules(expected))
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear) and module.lora_a is not None:
            w = np.asarray(module.kernel[...], np.float64)
            a, b = np.asarray(module.lora_a[...], np.float64), np.asarray(module.lora_b[...], np.float64)
            plain[path].kernel.set_value((w + a @ b * (ALPHA / RANK)).astype(np.float32))
    np.testing.assert_allclose(logits(model), logits(expected), atol=1e-5)
    assert np.abs(logits(model) - logits(init_model(TINY, seed=0))).max() > 1e-2  # the adapters matter


def test_fresh_adapters_leave_the_model_unchanged():
    base = logits(init_model(TINY, seed=0))
    fresh = add_lora(init_model(TINY, seed=0), LoraSection(rank=RANK, alpha=ALPHA), seed=3)
    np.testing.assert_array_equal(logits(fresh), base)
    a = [np.asarray(m.lora_a[...]) for _, m in nnx.iter_modules(fresh) if isinstance(m, Linear) and m.lora_a is not None]
    assert all(np.abs(x).max() > 0 for x in a)  # A is drawn, B is zero


def test_merge_keeps_the_function_and_removes_every_adapter():
    model = adapted_model()
    before = logits(model)
    merged = merge_lora(model)
    np.testing.assert_allclose(logits(merged), before, atol=1e-5)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert adapted_paths(merged) == set()


def test_targets_pick_the_projections_and_rank_zero_is_full_fine_tuning():
    assert adapted_paths(adapted_model(("q_proj", "down_proj"))) == {
        f"layers/{i}/{part}" for i in range(2) for part in ("self_attn/q_proj", "mlp/down_proj")
    }
    all_paths = adapted_paths(adapted_model())
    assert len(all_paths) == 2 * 7 and not any(p.endswith("lm_head") for p in all_paths)
    untouched = add_lora(init_model(TINY, seed=0), LoraSection(rank=0), seed=0)
    assert adapted_paths(untouched) == set()


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match=r"LoRA targets \['qproj'\] match no projection"):
        add_lora(init_model(TINY, seed=0), LoraSection(rank=RANK, targets=("qproj",)))


def count_dots(fn, *args) -> int:
    """dot_general equations in the jaxpr of fn(*args), nested jaxprs included."""
    def walk(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "dot_general"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += walk(sub)
        return n

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_adapters_off_graph_is_the_base_model_without_adapter_matmuls():
    """The lora_off reference: the adapted model's own weights through adapters_off_graphdef give the
    base model's logits exactly, with as many matmuls as the base model (none spent on adapters)."""
    model = adapted_model()
    graphdef, state = nnx.split(model)
    off = adapters_off_graphdef(model)
    forward = lambda g: lambda s: nnx.merge(g, s)(IDS)
    base = init_model(TINY, seed=0)
    base_def, base_state = nnx.split(base)
    np.testing.assert_array_equal(np.asarray(forward(off)(state)), np.asarray(base(IDS)))
    assert count_dots(forward(off), state) == count_dots(forward(base_def), base_state)
    assert count_dots(forward(graphdef), state) == count_dots(forward(base_def), base_state) + 2 * len(adapted_paths(model))
    assert np.abs(logits(model) - logits(base)).max() > 1e-2  # the model itself keeps its adapters on
