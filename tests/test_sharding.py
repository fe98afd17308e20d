"""The ("data", "fsdp", "tensor") mesh on 8 emulated CPU devices (tests/conftest.py).

The sharded forward must equal the single-device forward, and the parameters must really be
split: every shard shape below is worked out by hand from the fixture's dimensions, not from
the partition rules under test.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from bpo_jax.models.hf import load_hf_model
from bpo_jax.models.llama import CausalLM
from bpo_jax.sharding import (
    MeshError,
    batch_sharding,
    make_mesh,
    param_partition_spec,
    param_sharding,
    resolve_mesh_shape,
    shard_batch,
    shard_model,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)]
TOL = 1e-5  # fp32 logits, max abs difference on real tokens (the logits reach ~4.5)

# llama_gqa: hidden 48, 4 query heads and 2 kv heads of 16 dims (q 64, k/v 32 wide), MLP 96,
# vocabulary 128, untied head. Shard shapes per mesh (data, fsdp, tensor), worked out by hand:
# embeddings [V, H] split vocab over tensor and hidden over fsdp; q/k/v/gate/up [H, out] split
# hidden over fsdp and heads/MLP over tensor; o/down [in, H] the other way round; lm_head [H, V]
# hidden over fsdp, vocab over tensor; norms whole.
LLAMA_SHARDS = {
    (8, 1, 1): {"embed": (128, 48), "q": (48, 64), "k": (48, 32), "gate": (48, 96), "o": (64, 48),
                "down": (96, 48), "lm_head": (48, 128), "norm": (48,)},
    (2, 4, 1): {"embed": (128, 12), "q": (12, 64), "k": (12, 32), "gate": (12, 96), "o": (64, 12),
                "down": (96, 12), "lm_head": (12, 128), "norm": (48,)},
    (1, 2, 4): {"embed": (32, 24), "q": (24, 16), "k": (24, 8), "gate": (24, 24), "o": (16, 24),
                "down": (24, 24), "lm_head": (24, 32), "norm": (48,)},
    (2, 2, 2): {"embed": (64, 24), "q": (24, 32), "k": (24, 16), "gate": (24, 48), "o": (32, 24),
                "down": (48, 24), "lm_head": (24, 64), "norm": (48,)},
}
LLAMA_PARAMS = {
    "embed": ("embed_tokens", "embedding"), "q": ("layers", 1, "self_attn", "q_proj", "kernel"),
    "k": ("layers", 0, "self_attn", "k_proj", "kernel"), "gate": ("layers", 0, "mlp", "gate_proj", "kernel"),
    "o": ("layers", 1, "self_attn", "o_proj", "kernel"), "down": ("layers", 1, "mlp", "down_proj", "kernel"),
    "lm_head": ("lm_head", "kernel"), "norm": ("layers", 0, "input_layernorm", "scale"),
}


@functools.cache
def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "reference.npz") as f:
        return dict(f)


def mixed_padding_batch(name: str) -> tuple[np.ndarray, np.ndarray]:
    """8 rows: the fixture's right-padded batch and its left-padded batch stacked."""
    ref = reference(name)
    ids = np.concatenate([ref["right_input_ids"], ref["left_input_ids"]]).astype(np.int32)
    mask = np.concatenate([ref["right_attention_mask"], ref["left_attention_mask"]]).astype(np.int32)
    return ids, mask


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def forward(model: CausalLM, ids, mask) -> jax.Array:
    return _forward(*nnx.split(model), ids, mask)


@functools.cache
def unsharded_logits(name: str) -> np.ndarray:
    model = load_hf_model(FIXTURES / name)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(nnx.state(model)))
    return np.asarray(forward(model, *mixed_padding_batch(name)))


def param(model: CausalLM, path: tuple) -> jax.Array:
    return dict(nnx.to_flat_state(nnx.state(model)))[path][...]


def assert_split_as(x: jax.Array, shard_shape: tuple[int, ...], mesh_shape: tuple[int, int, int]) -> None:
    """x lies on all 8 devices in pieces of `shard_shape` that tile it exactly, each piece held
    by data-axis replicas only (fsdp x tensor distinct pieces, or one whole copy)."""
    assert len(x.sharding.device_set) == 8
    shards = x.addressable_shards
    assert {s.data.shape for s in shards} == {shard_shape}, x.sharding
    pieces = {tuple((i.start or 0, i.stop) for i in s.index) for s in shards}
    n_pieces = int(np.prod(x.shape) // np.prod(shard_shape))
    assert len(pieces) == n_pieces
    assert all(sum(1 for s in shards if tuple((i.start or 0, i.stop) for i in s.index) == p) == 8 // n_pieces
               for p in pieces)
    whole = np.asarray(x)
    for s in shards:  # every piece holds its own slice of the parameter
        np.testing.assert_array_equal(np.asarray(s.data), whole[s.index])


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_llama_forward_on_mesh_matches_unsharded(mesh_shape):
    """GQA, untied head, llama3 rope; the batch mixes right- and left-padded rows."""
    assert jax.device_count() == 8
    mesh = make_mesh(mesh_shape)
    model = load_hf_model(FIXTURES / "llama_gqa", shardings=param_sharding(mesh))
    for key, path in LLAMA_PARAMS.items():
        assert_split_as(param(model, path), LLAMA_SHARDS[mesh_shape][key], mesh_shape)
    # same values as the single-device load, bit for bit
    plain = load_hf_model(FIXTURES / "llama_gqa")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(plain))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))

    ids, mask = mixed_padding_batch("llama_gqa")
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    rows_per_device = 8 // (mesh_shape[0] * mesh_shape[1])
    assert {s.data.shape for s in batch["ids"].addressable_shards} == {(rows_per_device, 12)}
    logits = forward(model, batch["ids"], batch["mask"])
    assert len(logits.sharding.device_set) == 8
    diff = np.abs(np.asarray(logits) - unsharded_logits("llama_gqa"))[mask.astype(bool)].max()
    assert diff <= TOL, diff
    # and the single-device forward itself is transformers' (so the comparison is not vacuous)
    np.testing.assert_allclose(unsharded_logits("llama_gqa")[:4][mask[:4].astype(bool)],
                               reference("llama_gqa")["right_logits"][mask[:4].astype(bool)], atol=1e-4)


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), (2, 2, 2)])
def test_qwen2_tied_forward_on_mesh_matches_unsharded(mesh_shape):
    """qkv biases split with their heads; the tied head reads the sharded embedding transposed."""
    mesh = make_mesh(mesh_shape)
    model = shard_model(load_hf_model(FIXTURES / "qwen2_tied"), mesh)  # placement after loading
    _, f, t = mesh_shape
    # hidden 32, 4 query heads and 2 kv heads of 8 dims: q 32 wide, k 16 wide (biases likewise)
    assert_split_as(param(model, ("embed_tokens", "embedding")), (128 // t, 32 // f), mesh_shape)
    assert_split_as(param(model, ("layers", 0, "self_attn", "q_proj", "bias")), (32 // t,), mesh_shape)
    assert_split_as(param(model, ("layers", 1, "self_attn", "k_proj", "bias")), (16 // t,), mesh_shape)
    assert_split_as(param(model, ("layers", 1, "self_attn", "k_proj", "kernel")), (32 // f, 16 // t), mesh_shape)
    assert model.lm_head is None
    ids, mask = mixed_padding_batch("qwen2_tied")
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    logits = np.asarray(forward(model, batch["ids"], batch["mask"]))
    diff = np.abs(logits - unsharded_logits("qwen2_tied"))[mask.astype(bool)].max()
    assert diff <= TOL, diff


def test_load_with_shardings_equals_shard_model():
    mesh = make_mesh((2, 2, 2))
    direct = load_hf_model(FIXTURES / "mistral", shardings=param_sharding(mesh))
    moved = shard_model(load_hf_model(FIXTURES / "mistral"), mesh)
    a, b = nnx.to_flat_state(nnx.state(direct)), nnx.to_flat_state(nnx.state(moved))
    for (path, x), (_, y) in zip(a, b):
        assert x[...].sharding.is_equivalent_to(y[...].sharding, x[...].ndim), path
    # mistral's single kv head (k_proj 32 x 8) still splits 8 columns over tensor = 2
    k = dict(a)[("layers", 0, "self_attn", "k_proj", "kernel")][...]
    assert k.sharding.shard_shape(k.shape) == (16, 4)


def test_dimensions_that_do_not_divide_stay_whole():
    mesh = make_mesh((1, 2, 4))
    k = ("layers", 0, "self_attn", "k_proj", "kernel")
    assert param_partition_spec(k, (48, 32), mesh) == P("fsdp", "tensor")
    assert param_partition_spec(k, (48, 18), mesh) == P("fsdp", None)  # 18 % 4 != 0
    assert param_partition_spec(k, (7, 18), mesh) == P(None, None)
    assert param_partition_spec(("embed_tokens", "embedding"), (130, 48), mesh) == P(None, "fsdp")
    assert param_partition_spec(("layers", 3, "mlp", "down_proj", "lora_b"), (8, 48), mesh) == P(None, "fsdp")
    assert param_partition_spec(("norm", "scale"), (48,), mesh) == P(None)
    assert param_partition_spec(("something", "else"), (48, 48), mesh) == P()  # no rule: replicated


def test_mesh_shapes_and_errors():
    assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    assert resolve_mesh_shape({"data": 2, "tensor": -1}, 8) == (2, 1, 4)
    assert dict(make_mesh({"data": 2, "fsdp": -1}).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])  # a single device is a 1x1x1 mesh
    assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    for shape, message in [
        ((-1, -1, 1), "at most one axis may be -1"),
        ((3, -1, 1), "does not divide 8 devices"),
        ((2, 2, 1), "needs 4 devices, but 8 are available"),
        ((2, 0, 4), "sizes must be positive"),
        ((8, 1), "needs 3 sizes"),
    ]:
        with pytest.raises(MeshError, match=message):
            resolve_mesh_shape(shape, 8)


def test_batch_sharding_splits_rows_over_data_and_fsdp():
    mesh = make_mesh((2, 2, 2))
    assert batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    batch = shard_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh)
    shards = batch["x"].addressable_shards
    assert {s.data.shape for s in shards} == {(2, 3)}
    assert sorted({s.index[0].start for s in shards}) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="batch field 'x': 6 rows do not split over 4 data shards"):
        shard_batch({"x": np.zeros((6, 3))}, mesh)
