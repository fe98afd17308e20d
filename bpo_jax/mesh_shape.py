"""The mesh's axes and the arithmetic of its shape, without JAX.

Why a module of its own: config validation checks a mesh against a device count before any heavy
module is loaded (a config error is reported in a fraction of a second); bpo_jax.sharding builds the
JAX mesh from the same shape.
"""

from __future__ import annotations

import math
from typing import Sequence

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(ValueError):
    """A mesh shape that does not fit the available devices."""


def resolve_mesh_shape(shape: dict[str, int] | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Fill in at most one -1 axis so the product equals `num_devices`."""
    dims = [int(shape.get(a, 1)) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
    if len(dims) != len(MESH_AXES):
        raise MeshError(f"mesh needs {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {dims}")
    if dims.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, dims))}: at most one axis may be -1")
    if any(d == 0 or d < -1 for d in dims):
        raise MeshError(f"mesh {dict(zip(MESH_AXES, dims))}: sizes must be positive (or -1 for the rest)")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, dims))} does not divide {num_devices} devices")
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, but {num_devices} are available"
        )
    return tuple(dims)  # type: ignore[return-value]
