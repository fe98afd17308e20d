"""DPO batching: layout vs a loop reference, buckets, determinism, resumable state, host shards."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from bpo_jax.data import (
    PreferenceBatcher,
    RaggedTokens,
    TokenizedPairs,
    collate_pairs,
    length_buckets,
    pad_and_stack,
    pick_bucket,
    to_global_batch,
)

PAD = 0


def _data(n: int, seed: int = 0, max_length: int = 40) -> TokenizedPairs:
    rng = np.random.default_rng(seed)

    def seqs(lo, hi):
        return [rng.integers(1, 100, size=rng.integers(lo, hi)).tolist() for _ in range(n)]

    return TokenizedPairs(
        prompt=RaggedTokens.from_lists(seqs(1, 12)),
        chosen=RaggedTokens.from_lists(seqs(1, 20)),
        rejected=RaggedTokens.from_lists(seqs(1, 20)),
        ids=np.array([f"e{i}" for i in range(n)]),
        source_index=np.arange(n),
        max_length=max_length,
        pad_id=PAD,
    ).with_ref_logps(-rng.random(n), -rng.random(n))


def _reference_row(data, i, side, length):
    """One batch row built with plain lists."""
    if i < 0:
        return [PAD] * length, [0] * length, [0] * length
    p, r = data.prompt[i].tolist(), getattr(data, side)[i].tolist()
    ids = p + r + [PAD] * (length - len(p) - len(r))
    attention = [1] * (len(p) + len(r)) + [0] * (length - len(p) - len(r))
    loss = [0] * len(p) + [1] * len(r) + [0] * (length - len(p) - len(r))
    return ids, attention, loss


def test_collate_matches_loop_reference():
    data = _data(30)
    indices = np.array([5, 0, 29, -1, 17, 5, -1])
    length = int(data.seq_lengths.max())
    batch = collate_pairs(data, indices, length)
    for side in ("chosen", "rejected"):
        rows = [_reference_row(data, i, side, length) for i in indices]
        assert batch[f"{side}_input_ids"].tolist() == [r[0] for r in rows]
        assert batch[f"{side}_attention_mask"].tolist() == [r[1] for r in rows]
        assert batch[f"{side}_loss_mask"].tolist() == [r[2] for r in rows]
    real = indices >= 0
    assert batch["valid"].tolist() == real.astype(float).tolist()
    assert batch["example_index"].tolist() == indices.tolist()
    assert np.allclose(batch["ref_chosen_logps"][real], data.ref_chosen_logps[indices[real]])
    assert (batch["ref_chosen_logps"][~real] == 0).all()


def test_buckets_and_pad_and_stack():
    assert length_buckets(200) == (64, 128, 192, 200)
    assert length_buckets(64) == (64,) and length_buckets(10, 4) == (4, 8, 10)
    assert [pick_bucket(n, (8, 16, 32)) for n in (1, 8, 9, 32)] == [8, 8, 16, 32]
    with pytest.raises(ValueError, match="exceeds the largest length bucket 32"):
        pick_bucket(33, (8, 16, 32))
    out = pad_and_stack([[3, 4, 5], [], [7]], 4, pad_id=-1)
    assert out.dtype == np.int32 and out.tolist() == [[3, 4, 5, -1], [-1, -1, -1, -1], [7, -1, -1, -1]]
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens, more than length=2"):
        pad_and_stack([[1, 2, 3]], 2, 0)


def test_batch_length_is_smallest_bucket_fitting_the_global_batch():
    data = _data(50)
    b = PreferenceBatcher(data, 8, seed=3, buckets=(8, 16, 24, 32, 40))
    for pos in range(b.batches_per_epoch):
        idx = b.global_indices(0, pos)
        longest = data.seq_lengths[idx[idx >= 0]].max()
        L = b.batch_at(0, pos)["chosen_input_ids"].shape[1]
        assert L >= longest and L - 8 < longest
        assert b.batch_at(0, pos)["rejected_input_ids"].shape == (8, L)
    assert PreferenceBatcher(data, 8).buckets == (40,)  # default: multiples of 64 below max_length, then max_length
    with pytest.raises(ValueError, match="exceeds the largest length bucket"):
        PreferenceBatcher(data, 8, buckets=(8,))


def test_epochs_filler_and_drop_last():
    data = _data(10)
    b = PreferenceBatcher(data, 4, seed=1)
    assert b.batches_per_epoch == 3
    order = np.concatenate([b.global_indices(0, p) for p in range(3)])
    assert sorted(order[:10].tolist()) == list(range(10)) and order[10:].tolist() == [-1, -1]
    last = b.batch_at(0, 2)
    assert last["valid"].tolist() == [1, 1, 0, 0] and last["example_index"][2:].tolist() == [-1, -1]
    assert PreferenceBatcher(data, 4, drop_last=True).batches_per_epoch == 2
    assert PreferenceBatcher(data, 4, shuffle=False).global_indices(1, 0).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="gives no batches"):
        PreferenceBatcher(data, 16, drop_last=True)


def test_same_seed_same_order_other_epoch_or_seed_other_order():
    data = _data(40)
    a, b = PreferenceBatcher(data, 8, seed=7), PreferenceBatcher(data, 8, seed=7)
    for _ in range(12):  # crosses two epoch boundaries (5 batches per epoch)
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), PreferenceBatcher(data, 8, seed=8).epoch_order(0))
    assert sorted(a.epoch_order(1).tolist()) == list(range(40))


def test_restoring_state_continues_with_exactly_the_next_batch():
    data = _data(27)
    a = PreferenceBatcher(data, 4, seed=11)  # 7 batches per epoch, last one padded
    for _ in range(9):
        next(a)
    state = json.loads(json.dumps(a.get_state()))  # a checkpoint stores it as JSON
    assert (state["epoch"], state["position"]) == (1, 2)
    expected = [next(a) for _ in range(8)]

    b = PreferenceBatcher(data, 4, seed=11)
    b.set_state(state)
    got = [next(b) for _ in range(8)]
    for x, y in zip(expected, got):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="seed=11 but this batcher has seed=12"):
        PreferenceBatcher(data, 4, seed=12).set_state(state)
    with pytest.raises(ValueError, match="out of range"):
        b.set_state({"epoch": 0, "position": 7})


def test_two_hosts_read_disjoint_shards_of_each_global_batch():
    data = _data(23)
    single = PreferenceBatcher(data, 8, seed=5)
    hosts = [PreferenceBatcher(data, 8, seed=5, process_index=i, process_count=2) for i in range(2)]
    assert hosts[0].local_batch_size == 4
    seen = []
    for pos in range(single.batches_per_epoch):
        whole = single.batch_at(0, pos)
        parts = [h.batch_at(0, pos) for h in hosts]
        assert parts[0]["chosen_input_ids"].shape == parts[1]["chosen_input_ids"].shape == (4, whole["chosen_input_ids"].shape[1])
        for k in whole:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        mine = [set(p["example_index"][p["example_index"] >= 0].tolist()) for p in parts]
        assert not mine[0] & mine[1]
        seen += sorted(mine[0] | mine[1])
    assert sorted(seen) == list(range(23))
    with pytest.raises(ValueError, match="multiple of process_count"):
        PreferenceBatcher(data, 7, process_count=2)


def test_to_global_batch_on_one_device():
    batch = PreferenceBatcher(_data(9), 4, seed=0).batch_at(0, 0)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    out = to_global_batch(batch, mesh, PartitionSpec("data"))
    assert out.keys() == batch.keys()
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.dtype == batch[k].dtype
        assert np.array_equal(np.asarray(v), batch[k])


EIGHT_DEVICE_CHECK = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec
    from bpo_jax.data import PreferenceBatcher, RaggedTokens, TokenizedPairs, to_global_batch
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    seqs = lambda: [rng.integers(1, 9, size=rng.integers(1, 6)).tolist() for _ in range(20)]
    data = TokenizedPairs(RaggedTokens.from_lists(seqs()), RaggedTokens.from_lists(seqs()), RaggedTokens.from_lists(seqs()),
                          np.array([str(i) for i in range(20)]), np.arange(20), 16, 0)
    batch = PreferenceBatcher(data, 8, seed=1).batch_at(0, 2)
    for shape, spec in [((8,), PartitionSpec("data")), ((4, 2), PartitionSpec(("data", "fsdp")))]:
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp")[: len(shape)])
        out = to_global_batch(batch, mesh, spec)
        for k, v in out.items():
            assert np.array_equal(np.asarray(v), batch[k]), k
            rows = sorted((s.index[0].start, np.asarray(s.data).tolist()) for s in v.addressable_shards)
            assert [r[0] for r in rows] == list(range(8)), k  # one row per device
            assert all(np.array_equal(d, batch[k][i : i + 1]) for i, d in rows), k
    try:
        to_global_batch({"valid": batch["valid"][:6]}, mesh, PartitionSpec(("data", "fsdp")))
    except ValueError as e:
        assert "6 global rows do not split over 8 shards" in str(e), e
    else:
        raise AssertionError("expected an error")
    print("OK")
    """
)


def test_to_global_batch_on_eight_emulated_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICE_CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


TWO_PROCESS_CHECK = textwrap.dedent(
    """
    import sys, jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, PartitionSpec
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
    from bpo_jax.data import PreferenceBatcher, RaggedTokens, TokenizedPairs, to_global_batch
    rng = np.random.default_rng(0)
    seqs = lambda: [rng.integers(1, 9, size=rng.integers(1, 6)).tolist() for _ in range(21)]
    data = TokenizedPairs(RaggedTokens.from_lists(seqs()), RaggedTokens.from_lists(seqs()), RaggedTokens.from_lists(seqs()),
                          np.array([str(i) for i in range(21)]), np.arange(21), 16, 0)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    host = PreferenceBatcher(data, 8, seed=1, process_index=jax.process_index(), process_count=jax.process_count())
    single = PreferenceBatcher(data, 8, seed=1)
    for pos in range(single.batches_per_epoch):
        whole = single.batch_at(0, pos)
        out = to_global_batch(host.batch_at(0, pos), mesh, PartitionSpec("data"))
        for k, v in out.items():
            assert v.shape == whole[k].shape, k
            assert np.array_equal(multihost_utils.process_allgather(v, tiled=True), whole[k]), k
    print("OK")
    """
)


def test_to_global_batch_across_two_real_processes():
    """Two jax.distributed processes over loopback assemble the same global batches as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", TWO_PROCESS_CHECK, str(i), port], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0 and out.strip().endswith("OK"), err[-3000:]
