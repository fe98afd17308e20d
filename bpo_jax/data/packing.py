"""Packed DPO batches: many (prompt, chosen) and (prompt, rejected) sequences per row, no padding compute.

A padded DPO batch (see `bpo_jax.data.batching`) pads every sequence to the longest of the batch;
with long-tailed lengths most of its [2B, L] cells are padding that still costs attention and MLP
FLOPs. `pack_batch` lays the same sequences end to end into fewer rows with first-fit decreasing
and marks each sequence by a segment id, so the model attends only within a sequence
(`CausalLM(..., positions=, segment_ids=)`) and the loss sums log-probs per segment
(`losses.packed_sequence_logps`). The result equals the padded batch's, pair for pair.

Packed batch format (R rows of length L):

    input_ids, segment_ids, positions, loss_mask   int32 [R, L]
    valid, example_index, ref_chosen_logps, ...    [B], copied unchanged from the padded batch

Segment ids encode the pair: within its micro-batch, example m's chosen sequence is segment 2m+1 and
its rejected sequence 2m+2 (0 is padding), so per-sequence sums come out in pair order with no
index arrays. Positions restart at 0 in each segment, as in the padded batch. With gradient
accumulation (k micro-batches) the trainer splits rows and examples interleaved (row r and example
i go to micro-batch r % k and i % k); `pack_batch(groups=k)` packs each micro-batch's examples
into its own rows in that layout.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

Batch = dict[str, np.ndarray]

PACKED_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")
_SIDES = ("chosen", "rejected")


def is_packed(batch: Mapping[str, object]) -> bool:
    """True for a packed batch (segment ids), False for a padded one."""
    return "segment_ids" in batch


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Bin of each item: longest first (ties: lower index first), each into the first bin with room.

    Deterministic. Uses at most 11/9 OPT + 6/9 bins. One NumPy step per item: the items are the
    2B sequences of one batch, so this stays far below the cost of the train step.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        i = int(np.argmax((lengths < 1) | (lengths > capacity)))
        raise ValueError(f"item {i} has length {lengths[i]}; items must have 1..{capacity} tokens")
    bins = np.empty(lengths.size, np.int64)
    room = np.empty(0, np.int64)
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(room >= lengths[i])
        if fits.size:
            b = int(fits[0])
        else:
            b = room.size
            room = np.append(room, capacity)
        room[b] -= lengths[i]
        bins[i] = b
    return bins


def pack_batch(
    batch: Mapping[str, np.ndarray],
    *,
    row_length: int | None = None,
    groups: int = 1,
    row_multiple: int = 1,
) -> Batch:
    """Pack a padded DPO batch (right-padded rows) into segment-id rows (format in the module doc).

    row_length: tokens per packed row (default: the padded batch's length L, so a packed row is
    never longer than a padded one). groups: micro-batches the trainer will split the batch into.
    row_multiple: rows per micro-batch are rounded up to a multiple of this (the number of data
    shards), and all micro-batches get the same number of rows, so the arrays split evenly.
    """
    lengths, length = _sequence_lengths(batch)
    row_length = length if row_length is None else row_length
    n_examples = lengths.shape[0]
    if groups < 1 or n_examples % groups or row_multiple < 1:
        raise ValueError(
            f"groups ({groups}) must divide the batch ({n_examples} pairs) and row_multiple ({row_multiple}) be >= 1"
        )
    if lengths.max(initial=0) > row_length:
        raise ValueError(f"a sequence has {lengths.max()} tokens, more than row_length={row_length}")

    # Items: (example i, side s) in micro-batch i % groups, local example i // groups.
    example, side = np.divmod(np.arange(2 * n_examples), 2)
    item_len = lengths.reshape(-1)
    group, local = example % groups, example // groups
    bin_of = np.full(item_len.size, -1, np.int64)
    rows_needed = 1
    for g in range(groups):
        sel = np.flatnonzero((group == g) & (item_len > 0))
        if sel.size:
            bin_of[sel] = first_fit_decreasing(item_len[sel], row_length)
            rows_needed = max(rows_needed, int(bin_of[sel].max()) + 1)
    rows_per_group = -(-rows_needed // row_multiple) * row_multiple
    placed = np.flatnonzero(bin_of >= 0)
    row = bin_of[placed] * groups + group[placed]  # interleaved: micro-batch g owns rows g, g+k, ...

    # Column of each item: items of a row in item order, end to end.
    order = np.lexsort((placed, row))
    row_sorted, len_sorted = row[order], item_len[placed][order]
    ends = np.cumsum(len_sorted)
    row_start = np.searchsorted(row_sorted, row_sorted, side="left")
    col0 = ends - len_sorted - np.concatenate([[0], ends])[row_start]

    out = {key: np.zeros((rows_per_group * groups, row_length), np.int32) for key in PACKED_KEYS}
    items = placed[order]
    for s, name in enumerate(_SIDES):
        mine = side[items] == s
        ex = example[items][mine]
        n = len_sorted[mine]
        src_row = np.repeat(ex, n)
        src_col = _ranges(n)
        dst_row = np.repeat(row_sorted[mine], n)
        dst_col = np.repeat(col0[mine], n) + src_col
        out["input_ids"][dst_row, dst_col] = batch[f"{name}_input_ids"][src_row, src_col]
        out["loss_mask"][dst_row, dst_col] = batch[f"{name}_loss_mask"][src_row, src_col]
        out["positions"][dst_row, dst_col] = src_col
        out["segment_ids"][dst_row, dst_col] = np.repeat(2 * local[items][mine] + 1 + s, n)
    for key, value in batch.items():
        if not key.startswith(_SIDES):
            out[key] = np.asarray(value)
    return out


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
    """Share of the token cells a batch computes on that hold no real token (padded or packed)."""
    if is_packed(batch):
        cells = np.asarray(batch["segment_ids"])
        return float(1.0 - np.count_nonzero(cells) / cells.size)
    real = sum(np.count_nonzero(batch[f"{s}_attention_mask"]) for s in _SIDES)
    cells = sum(np.size(batch[f"{s}_attention_mask"]) for s in _SIDES)
    return float(1.0 - real / cells)


def _sequence_lengths(batch: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """[B, 2] real-token counts (chosen, rejected) of a right-padded batch, and its length L."""
    lengths = []
    for name in _SIDES:
        mask = np.asarray(batch[f"{name}_attention_mask"]) != 0
        n = mask.sum(axis=1)
        prefix = np.arange(mask.shape[1])[None, :] < n[:, None]
        if not np.array_equal(mask, prefix):
            r = int(np.flatnonzero((mask != prefix).any(axis=1))[0])
            raise ValueError(f"batch field '{name}_attention_mask', row {r}: not right-padded; cannot pack")
        lengths.append(n)
    return np.stack(lengths, axis=1).astype(np.int64), int(batch["chosen_input_ids"].shape[1])


def _ranges(n: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..n0), [0..n1), ... (flat)."""
    total = int(n.sum())
    starts = np.repeat(np.cumsum(n) - n, n)
    return np.arange(total, dtype=np.int64) - starts
