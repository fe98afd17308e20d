"""DPO batches: deterministic shuffling, length buckets, per-host shards, resumable iteration.

The batch format every other module relies on (a dict of NumPy arrays, B rows, L positions):

    chosen_input_ids, chosen_attention_mask, chosen_loss_mask        int32 [B, L]
    rejected_input_ids, rejected_attention_mask, rejected_loss_mask  int32 [B, L]  (same L)
    valid                                                            float32 [B]
    example_index                                                    int32 [B]
    ref_chosen_logps, ref_rejected_logps   float32 [B], only when the data carries them

Rows are right-padded: [prompt ids][response ids incl. EOS][pad ...]. attention_mask is 1 on
prompt+response, loss_mask is 1 exactly on the response tokens (EOS included). Filler rows (the
last batch of an epoch padded up to the global batch size) are all padding with valid = 0 and
example_index = -1. L is the smallest length bucket that fits the longest sequence of the GLOBAL
batch, so all hosts agree on shapes and XLA compiles once per bucket.

Multi-host: every host holds the (small) tokenized dataset, walks the same global order and
materializes only its own contiguous block of rows of each global batch (global_batch //
process_count rows); `to_global_batch` assembles the hosts' blocks into global jax.Arrays.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs

Batch = dict[str, np.ndarray]


def length_buckets(max_length: int, multiple: int = 64) -> tuple[int, ...]:
    """Multiples of `multiple` below `max_length`, then `max_length` itself."""
    if max_length < 1 or multiple < 1:
        raise ValueError(f"max_length ({max_length}) and multiple ({multiple}) must be >= 1")
    return tuple(range(multiple, max_length, multiple)) + (max_length,)


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"sequence length {length} exceeds the largest length bucket {max(buckets)}")
    return min(fitting)


def pad_and_stack(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> np.ndarray:
    """Right-pad integer sequences to `length` and stack them: int32 [len(seqs), length]."""
    ragged = RaggedTokens.from_lists(seqs)
    if len(ragged) and ragged.lengths.max() > length:
        i = int(np.argmax(ragged.lengths))
        raise ValueError(f"sequence {i} has {ragged.lengths[i]} tokens, more than length={length}")
    ids, _ = _place(ragged, np.zeros(len(ragged), np.int64), length, pad_id)
    return ids


def collate_pairs(data: TokenizedPairs, indices: np.ndarray, length: int) -> Batch:
    """The DPO batch for `indices` into `data` (-1 = filler row), padded to `length`."""
    indices = np.asarray(indices, dtype=np.int64)
    real = indices >= 0
    safe = np.where(real, indices, 0)
    zero = np.zeros(len(indices), np.int64)
    prompt = data.prompt.take(safe)
    prompt = RaggedTokens(prompt.flat, prompt.starts, np.where(real, prompt.lengths, 0))
    p_ids, p_mask = _place(prompt, zero, length, data.pad_id)
    batch: Batch = {}
    for side in ("chosen", "rejected"):
        resp = getattr(data, side).take(safe)
        resp = RaggedTokens(resp.flat, resp.starts, np.where(real, resp.lengths, 0))
        r_ids, r_mask = _place(resp, prompt.lengths, length, data.pad_id)
        batch[f"{side}_input_ids"] = np.where(p_mask, p_ids, r_ids)
        batch[f"{side}_attention_mask"] = (p_mask | r_mask).astype(np.int32)
        batch[f"{side}_loss_mask"] = r_mask.astype(np.int32)
    batch["valid"] = real.astype(np.float32)
    batch["example_index"] = np.where(real, indices, -1).astype(np.int32)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        values = getattr(data, key)
        if values is not None:
            batch[key] = np.where(real, values[safe], 0.0).astype(np.float32)
    return batch


class PreferenceBatcher:
    """Endless iterator of host-local DPO batches over epochs, restorable from `get_state()`.

    The order of epoch e is a permutation drawn from (seed, e) alone, and batch (e, p) is a pure
    function of it, so restoring {"epoch", "position"} continues with exactly the next batch.
    """

    def __init__(
        self,
        data: TokenizedPairs,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        buckets: Sequence[int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        if len(data) == 0:
            raise ValueError("no examples to batch (the tokenized dataset is empty)")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of process_count ({process_count})"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.data = data
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.process_index, self.process_count = process_index, process_count
        self.buckets = tuple(sorted(buckets or length_buckets(data.max_length)))
        self._seq_lengths = data.seq_lengths
        pick_bucket(int(self._seq_lengths.max()), self.buckets)  # fail now, not mid-epoch
        n = len(data)
        self.batches_per_epoch = n // global_batch_size if drop_last else -(-n // global_batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"drop_last with {n} examples < global_batch_size {global_batch_size} gives no batches")
        self.epoch = 0
        self.position = 0
        self._order_epoch, self._order = -1, np.arange(0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of `epoch` (identity without shuffling)."""
        if epoch != self._order_epoch:
            n = len(self.data)
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def global_indices(self, epoch: int, position: int) -> np.ndarray:
        """Example indices of global batch `position` of `epoch`; -1 marks filler rows."""
        if not 0 <= position < self.batches_per_epoch:
            raise IndexError(f"position {position} not in [0, {self.batches_per_epoch})")
        g = self.global_batch_size
        rows = self.epoch_order(epoch)[position * g : (position + 1) * g]
        return np.concatenate([rows, np.full(g - len(rows), -1, np.int64)])

    def batch_at(self, epoch: int, position: int) -> Batch:
        """This host's rows of global batch (epoch, position)."""
        indices = self.global_indices(epoch, position)
        real = indices[indices >= 0]
        length = pick_bucket(int(self._seq_lengths[real].max()), self.buckets)
        local = indices[self.process_index * self.local_batch_size : (self.process_index + 1) * self.local_batch_size]
        return collate_pairs(self.data, local, length)

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """All batches of one epoch in order (evaluation); does not move the iterator state."""
        for position in range(self.batches_per_epoch):
            yield self.batch_at(epoch, position)

    def __iter__(self) -> "PreferenceBatcher":
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def get_state(self) -> dict[str, int]:
        """Where the iterator is (the next batch to produce) plus what the state is valid for."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": len(self.data),
            "global_batch_size": self.global_batch_size,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `get_state()` dict; refuses a state taken on different data or settings."""
        for key, mine in (("seed", self.seed), ("num_examples", len(self.data)), ("global_batch_size", self.global_batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"data iterator state: {key}={state[key]} but this batcher has {key}={mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"data iterator state: epoch={epoch}, position={position} out of range")
        self.epoch, self.position = epoch, position


def to_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Any, batch_partition_spec: Any) -> dict[str, Any]:
    """Assemble every host's local rows into global jax.Arrays sharded along the batch dimension.

    `batch_partition_spec` shards the leading (batch) dimension, e.g. PartitionSpec(("data", "fsdp"));
    entries beyond an array's rank are dropped and unnamed trailing dimensions are replicated.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    spec = tuple(batch_partition_spec)
    axes = spec[0] if spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out = {}
    for key, value in host_batch.items():
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % shards:
            raise ValueError(
                f"batch field '{key}': {global_rows} global rows do not split over {shards} shards of mesh axes {axes}"
            )
        sharding = NamedSharding(mesh, PartitionSpec(*spec[: value.ndim]))
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _place(seqs: RaggedTokens, col0: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay sequence i into row i at columns [col0[i], col0[i] + len_i) of a [n, length] grid.

    Returns (ids with pad_id elsewhere, mask of the placed cells); positions past `length` are cut.
    """
    cols = np.arange(length)[None, :] - col0[:, None]
    mask = (cols >= 0) & (cols < seqs.lengths[:, None])
    if seqs.flat.size == 0:
        return np.full(mask.shape, pad_id, np.int32), mask
    src = np.clip(seqs.starts[:, None] + cols, 0, seqs.flat.size - 1)
    return np.where(mask, seqs.flat[src], pad_id).astype(np.int32), mask
