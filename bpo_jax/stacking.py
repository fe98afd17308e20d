"""Several models of one shape as one program: how a function runs over a leading "arm" axis.

Two ways, same results (up to float rounding), one compiled program either way:
  vmap  every op gains an arm dimension (batched matrix products): the natural fit for
        accelerators, whose kernels want large batches;
  map   `lax.map`: a loop over arms inside the program, each arm's ops exactly as alone.
On XLA:CPU batched matrix products are slow: for the studies' model (2 layers, hidden 64, 32
pairs x 32 tokens per arm), 16 arms ran 0.76x (training) and 0.75x (sampling) the speed of 16
separate jitted calls under vmap, and 1.11x and 1.07x under map (bench/bench_arms.py, docs/
benchmarks.md). "auto" picks map on CPU and vmap on accelerators (not measured there yet).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
from flax import nnx

MODES = ("auto", "vmap", "map")


class ArmWeights(NamedTuple):
    """Models of one shape as one pytree: `params` stacked on a leading arm axis, `frozen` (the
    non-trained rest) shared; `nnx.merge(graphdef, params[a], frozen)` is arm a's model."""

    graphdef: nnx.GraphDef
    params: nnx.State
    frozen: nnx.State
    mode: str = "auto"

    @property
    def num_arms(self) -> int:
        return int(jax.tree.leaves(self.params)[0].shape[0])


def resolve(mode: str) -> str:
    """'vmap' or 'map' for `mode` ('auto': map on CPU, vmap on accelerators)."""
    if mode not in MODES:
        raise ValueError(f"unknown arm mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return mode


def over_arms(fn: Callable, mode: str) -> Callable:
    """fn(*per_arm_args) applied over the leading axis of every argument (use inside jit)."""
    if resolve(mode) == "vmap":
        return jax.vmap(fn)
    return lambda *stacked: jax.lax.map(lambda args: fn(*args), stacked)
