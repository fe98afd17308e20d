"""Multi-host runs (JAX's multi-controller runtime): joining the processes, who does which share of
the work, and how host-local pieces become global arrays.

Every process runs the same command (docs/multihost.md). The rules:
- Work that is independent per prompt (sampling, scoring, gradient features) is split by prompt:
  process p of P takes prompts p, p + P, p + 2P, ... (`share`) and runs them on its own devices
  (`local_mesh`), with no cross-host traffic. Random keys and outputs are per prompt and merged
  files are put in input order, so merged outputs do not depend on P.
- Training and SFT use the global mesh: every host walks the same global batch order and
  materializes only its own rows of each batch (`PreferenceBatcher(process_index=...)`).
- Run files are written by process 0 only (bpo_jax.io_utils); per-process files (partial chunks,
  feature shards) carry the process in their name. `barrier` follows a write that others read.
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from bpo_jax.sharding import make_mesh, state_shardings


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"bpo_jax {name}")


def share(n: int, process_index: int | None = None, process_count: int | None = None) -> np.ndarray:
    """Indices in [0, n) this process works on: every process_count-th, starting at its index."""
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return np.arange(p, n, count)


def local_mesh(mesh: Mesh) -> Mesh:
    """A mesh over this process's devices only, for per-prompt work: data-parallel, keeping the
    tensor axis when it fits in one host (a model too large for one host's memory needs it).
    A mesh that is already this process's own (e.g. single-process) is returned as it is."""
    if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        return mesh
    local = jax.local_devices()
    tensor = mesh.shape["tensor"] if len(local) % mesh.shape["tensor"] == 0 else 1
    return make_mesh((-1, 1, tensor), devices=local)


def to_local(tree: Any, mesh: Mesh) -> Any:
    """A pytree of (possibly cross-host) arrays gathered whole and placed on a local `mesh` by the
    partition rules: e.g. a model trained on the global mesh, for per-prompt work after it."""
    host = gather(tree)
    return jax.device_put(host, state_shardings(host, mesh))


def gather(tree: Any) -> Any:
    """Every array of a pytree whole on this host, as NumPy (collective for cross-host arrays)."""
    from bpo_jax.models.hf import _to_host as to_host

    return jax.tree.map(to_host, tree)


def allgather_max(value: int) -> int:
    """The largest `value` over all processes (a host-side integer agreement)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def host_packed_batch(packed: dict[str, np.ndarray], groups: int) -> dict[str, np.ndarray]:
    """This host's packed rows (bpo_jax.data.packing.pack_batch of its own pairs) made ready to join
    the global packed batch: segment ids shifted past the pairs of the hosts before it, and rows
    padded (segment 0) to the most any host needs, so every host contributes the same shape.

    Segment 2m+1 / 2m+2 is pair m of its micro-batch; host p's pairs follow those of hosts < p in
    the global batch, and rows stay interleaved by micro-batch (row r belongs to r % groups).
    """
    rows, pairs = packed["segment_ids"].shape[0], packed["valid"].shape[0]
    offset = 2 * jax.process_index() * (pairs // groups)
    out = dict(packed)
    out["segment_ids"] = np.where(packed["segment_ids"] > 0, packed["segment_ids"] + offset, 0).astype(np.int32)
    total = allgather_max(rows)
    for key in ("input_ids", "segment_ids", "positions", "loss_mask"):
        out[key] = np.pad(out[key], ((0, total - rows), (0, 0)))
    return out


def local_model(model: Any, mesh: Mesh) -> Any:
    """`model` (an NNX module, possibly sharded over all hosts) as a copy on a local `mesh`;
    single-process, the model itself (its arrays are local already)."""
    from flax import nnx

    if jax.process_count() == 1:
        return model

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, to_local(state, mesh))


def share_batches(data: Any, indices: np.ndarray, rows: int, buckets: tuple[int, ...] | None) -> Iterator[dict]:
    """DPO batches of `rows` rows over the examples `indices` in order (this process's share), the
    last one filled up with filler rows, each padded to the smallest length bucket that fits it
    (the batches PreferenceBatcher(shuffle=False) makes when `indices` are all examples)."""
    from bpo_jax.data.batching import collate_pairs, length_buckets, pick_bucket

    buckets = tuple(sorted(buckets or length_buckets(data.max_length)))
    for start in range(0, len(indices), rows):
        chunk = np.asarray(indices[start : start + rows], np.int64)
        length = pick_bucket(int(data.seq_lengths[chunk].max()), buckets)
        yield collate_pairs(data, np.pad(chunk, (0, rows - len(chunk)), constant_values=-1), length)


def host_rows() -> dict[str, int]:
    """PreferenceBatcher arguments by which this process materializes only its rows of each global
    batch (the global order is the same on every process)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def free_port() -> int:
    """A TCP port on localhost that is free now (for a local coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def local_process_commands(
    command: list[str], num_processes: int, devices_per_process: int, port: int | None = None
) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, extra environment) of each process of a multi-host run on this machine: `command`
    (a `python -m bpo_jax.main ...` line) joined over loopback, each process with its own emulated
    CPU devices. How the tests and bench/bench_multihost.py run multi-host code without a cluster."""
    import os

    port = port or free_port()
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()}
    return [
        (command + ["--set", "distributed.enabled=true", "--set", f"distributed.coordinator_address=localhost:{port}",
                    "--set", f"distributed.num_processes={num_processes}", "--set", f"distributed.process_id={i}"], env)
        for i in range(num_processes)
    ]
