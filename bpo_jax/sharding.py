"""Device mesh and parameter/batch placement.

One mesh with axes ("data", "fsdp", "tensor") serves every topology: a single CPU is a 1x1x1 mesh,
a GPU box (8,1,1), a TPU pod slice e.g. (1,64,1) or (4,8,2). Parameters are placed by
path-pattern rules (embeddings and projections split over fsdp x tensor, norms replicated); a
dimension that does not divide by its mesh axes stays whole on that dimension, so any model fits
any mesh. Batches are split over data x fsdp.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bpo_jax.mesh_shape import MESH_AXES, MeshError, resolve_mesh_shape

BATCH_AXES = ("data", "fsdp")

# (pattern on the "/"-joined parameter path, partition spec of the parameter's dimensions).
PARTITION_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens/embedding$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),
    (r"(o_proj|down_proj)/kernel$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", ("tensor",)),
    (r"(o_proj|down_proj)/bias$", (None,)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_a$", ("fsdp", None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b$", (None, "tensor")),
    (r"(o_proj|down_proj)/lora_a$", ("tensor", None)),
    (r"(o_proj|down_proj)/lora_b$", (None, "fsdp")),
    (r"lm_head/kernel$", ("fsdp", "tensor")),
    (r"score/kernel$", ("fsdp", None)),
    (r"(layernorm|norm)/scale$", (None,)),
)


def make_mesh(shape: dict[str, int] | Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    dims = resolve_mesh_shape(shape, len(devices))
    # Auto axes: XLA's sharding propagation places intermediates (the GSPMD model).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(dims, MESH_AXES, axis_types=auto, devices=devices)


def _fit_spec(spec: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide evenly (those stay whole)."""
    if len(spec) != len(shape):
        return P()
    fitted = []
    for axis, dim in zip(spec, shape):
        if axis is None or dim % mesh.shape[axis]:
            fitted.append(None)
        else:
            fitted.append(axis)
    return P(*fitted)


def param_partition_spec(path: Sequence[Any], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter, from PARTITION_RULES (replicated when none match)."""
    key = "/".join(str(p) for p in path)
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, key):
            return _fit_spec(spec, shape, mesh)
    return P()


def param_sharding(mesh: Mesh):
    """A `(path, shape) -> NamedSharding` function, as load_hf_model's `shardings` expects."""
    return lambda path, shape: NamedSharding(mesh, param_partition_spec(path, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings mirroring an NNX state (or any pytree of arrays keyed by parameter paths)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_partition_spec(_path_names(path), np.shape(x), mesh)), state
    )


def _path_names(path: Sequence[Any]) -> list[str]:
    """Key names of a pytree path, without the trailing `.value` of an NNX Variable."""
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names.pop()
    return names


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move every parameter of `model` onto the mesh according to the partition rules (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (example) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch (the whole global batch, single process) split over data x fsdp.

    Multi-host input goes through bpo_jax.data.batching.to_global_batch instead, where each
    process contributes only its own rows.
    """
    batch_size = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        if np.shape(v)[0] % batch_size:
            raise ValueError(f"batch field {k!r}: {np.shape(v)[0]} rows do not split over {batch_size} data shards")
        out[k] = jax.device_put(v, batch_sharding(mesh, np.ndim(v)))
    return out
