"""Packed DPO: first-fit-decreasing packing, the packed layout, and packed == padded losses/gradients.

Tolerances (float32): per-sequence log-probs agree to 1e-5 relative (the padded and packed
forwards differ only in masked attention entries, which contribute exact zeros, and in the
summation order of the per-segment sums); metrics to 1e-5 absolute (rewards are beta times a
difference of two log-probs of magnitude ~50, whose float32 rounding is ~1e-5); gradients to
1e-5 relative + 1e-7 absolute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from bpo_jax import distributed
from bpo_jax.config import LoraSection, ModelSection, OptimSection, RunConfig, TrainSection, validate
from bpo_jax.data.batching import collate_pairs
from bpo_jax.data.packing import first_fit_decreasing, is_packed, pack_batch, padding_fraction
from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
from bpo_jax.losses import packed_sequence_logps
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.sharding import make_mesh
from bpo_jax.train import DPOTrainer, _split_micro, concatenated_logps, response_token_counts

VOCAB = 64
MODEL = ModelConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)


def _reference_ffd(lengths: list[int], capacity: int) -> list[int]:
    """First-fit decreasing written plainly with Python lists (the independent implementation)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    loads: list[int] = []
    out = [0] * len(lengths)
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= capacity:
                loads[b] += lengths[i]
                out[i] = b
                break
        else:
            loads.append(lengths[i])
            out[i] = len(loads) - 1
    return out


def test_first_fit_decreasing_by_hand():
    # 5 -> bin 0; 4 -> bin 1; 3 -> bin 0 (full); 3 -> bin 1; 2 -> new bin 2; 1 -> bin 1 (full).
    assert first_fit_decreasing(np.array([5, 4, 3, 3, 2, 1]), 8).tolist() == [0, 1, 0, 1, 2, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=40))))
def test_first_fit_decreasing_matches_plain_implementation(case):
    capacity, lengths = case
    bins = first_fit_decreasing(np.array(lengths, np.int64), capacity)
    assert bins.tolist() == _reference_ffd(lengths, capacity)
    loads = np.bincount(bins, weights=lengths) if lengths else np.zeros(0)
    assert (loads <= capacity).all()
    assert (loads <= capacity / 2).sum() <= 1  # first fit: at most one bin at most half full


def test_first_fit_decreasing_rejects_oversized_item():
    with pytest.raises(ValueError, match="item 1 has length 9"):
        first_fit_decreasing(np.array([3, 9]), 8)


def _pairs(n: int, seed: int, max_length: int = 24, empty_prompt: bool = True) -> TokenizedPairs:
    """Random token pairs with long-tailed lengths; example 0 has an empty prompt when asked."""
    rng = np.random.default_rng(seed)

    def ragged(lo, hi, tail):
        lengths = np.minimum(rng.integers(lo, hi, size=n) + rng.geometric(0.3, size=n) * tail, hi)
        return RaggedTokens.from_lists([list(rng.integers(3, VOCAB, size=k)) for k in lengths])

    prompt = ragged(1, 8, 0)
    if empty_prompt:
        prompt = RaggedTokens(prompt.flat, prompt.starts, np.where(np.arange(n) == 0, 0, prompt.lengths))
    chosen, rejected = ragged(1, max_length - 8, 1), ragged(1, max_length - 8, 1)
    return TokenizedPairs(prompt, chosen, rejected, np.array([str(i) for i in range(n)]), np.arange(n), max_length, 0)


def test_pack_batch_layout_reproduces_every_sequence():
    data = _pairs(6, seed=1)
    indices = np.array([0, 1, 2, 3, 4, -1, 5, -1])  # two filler rows
    padded = collate_pairs(data, indices, 24)
    packed = pack_batch(padded, groups=2, row_multiple=2)
    assert is_packed(packed) and not is_packed(padded)
    rows = packed["input_ids"].shape[0]
    assert rows % 4 == 0  # 2 groups x rows rounded to a multiple of 2
    assert_packed_layout(packed, padded, indices, groups=2)
    real = int(padded["chosen_attention_mask"].sum() + padded["rejected_attention_mask"].sum())
    assert np.count_nonzero(packed["segment_ids"]) == real
    assert padding_fraction(packed) == pytest.approx(1 - real / packed["segment_ids"].size)
    assert padding_fraction(padded) == pytest.approx(1 - real / (2 * 8 * 24))


def test_hosts_pack_their_rows_into_one_global_batch(monkeypatch):
    """Multi-host packing (distributed.host_packed_batch), two hosts simulated: each packs its half
    of the global batch; with segment ids shifted past the other host's pairs and rows padded to
    the larger host's count, the joined rows hold every sequence where the trainer's interleaved
    micro-batch split expects it."""
    data = _pairs(8, seed=3)
    indices = np.array([0, 1, 2, 3, 4, 5, 6, -1])
    padded = collate_pairs(data, indices, 24)
    halves = [{k: v[4 * h : 4 * h + 4] for k, v in padded.items()} for h in (0, 1)]
    packed = [pack_batch(half, groups=2, row_multiple=1) for half in halves]
    most = max(p["input_ids"].shape[0] for p in packed)
    monkeypatch.setattr(distributed, "allgather_max", lambda value: most)
    joined = []
    for host, host_batch in enumerate(packed):
        monkeypatch.setattr(distributed.jax, "process_index", lambda host=host: host)
        joined.append(distributed.host_packed_batch(host_batch, groups=2))
    monkeypatch.undo()
    assert {j["input_ids"].shape[0] for j in joined} == {most}
    assert_packed_layout({k: np.concatenate([j[k] for j in joined]) for k in joined[0]}, padded, indices, groups=2)


def assert_packed_layout(packed, padded, indices, groups):
    """Every sequence of `padded` whole and contiguous in one row of its micro-batch of `packed`."""
    rows = packed["input_ids"].shape[0]
    np.testing.assert_array_equal(packed["valid"], padded["valid"])
    np.testing.assert_array_equal(packed["example_index"], padded["example_index"])
    for i, idx in enumerate(indices):
        group, local = i % groups, i // groups
        for side, name in enumerate(("chosen", "rejected")):
            # Segment ids are local to a micro-batch; micro-batch `group` owns rows group, group+k, ...
            owned = (np.arange(rows) % groups == group)[:, None]
            where = (packed["segment_ids"] == 2 * local + 1 + side) & owned
            if idx < 0:
                assert not where.any()
                continue
            r = np.flatnonzero(where.any(axis=1))
            assert len(r) == 1  # a sequence is never split over rows
            n = int(padded[f"{name}_attention_mask"][i].sum())
            cols = np.flatnonzero(where[r[0]])
            assert np.array_equal(cols, cols[0] + np.arange(n))  # contiguous
            np.testing.assert_array_equal(packed["input_ids"][r[0], cols], padded[f"{name}_input_ids"][i, :n])
            np.testing.assert_array_equal(packed["loss_mask"][r[0], cols], padded[f"{name}_loss_mask"][i, :n])
            np.testing.assert_array_equal(packed["positions"][r[0], cols], np.arange(n))


def test_pack_batch_rejects_left_padding():
    padded = collate_pairs(_pairs(2, seed=2), np.arange(2), 24)
    padded["rejected_attention_mask"][1] = padded["rejected_attention_mask"][1][::-1]
    with pytest.raises(ValueError, match="rejected_attention_mask', row 1: not right-padded"):
        pack_batch(padded)


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("vocab_chunk", [0, 24])
def test_packed_logps_equal_padded(vocab_chunk):
    model = init_model(MODEL, seed=0)
    padded = collate_pairs(_pairs(8, seed=3), np.arange(8), 24)
    packed = pack_batch(padded)
    assert packed["input_ids"].shape[0] < 16  # it did pack
    (pc, pr), (mc, mr) = concatenated_logps(model, _jnp(padded), vocab_chunk)
    (qc, qr), (nc, nr) = concatenated_logps(model, _jnp(packed), vocab_chunk)
    for a, b in ((pc, qc), (pr, qr), (mc, nc), (mr, nr)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    for a, b in zip(response_token_counts(_jnp(padded)), response_token_counts(_jnp(packed))):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # Example 0 has an empty prompt: its first response token is not scored in either layout.
    assert int(response_token_counts(_jnp(padded))[0][0]) == int(padded["chosen_loss_mask"][0].sum()) - 1


def _trainer(packing: bool, *, reference: str, loss_type: str, grad_accum: int, lora: bool) -> DPOTrainer:
    model = init_model(MODEL, seed=0)
    if lora:
        add_lora(model, LoraSection(rank=4, alpha=8.0), seed=1)
        # Nonzero B adapters (PEFT starts them at 0), so the lora_off reference differs from the policy.
        adapters = nnx.state(model, nnx.LoRAParam)
        keys = iter(jax.random.split(jax.random.PRNGKey(7), len(jax.tree.leaves(adapters))))
        nnx.update(model, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters))
    cfg = TrainSection(
        loss_type=loss_type, beta=0.3, reference=reference, batch_size=8, grad_accum_steps=grad_accum,
        packing=packing, optim=OptimSection(learning_rate=1e-2, schedule="constant"),
    )
    return DPOTrainer(model=model, config=cfg, mesh=make_mesh((2, 1, 1), jax.devices()[:2]), total_steps=2)


def _grads(trainer: DPOTrainer, batch):
    """Summed micro-batch gradients and metric sums, as the train step accumulates them."""
    placed = trainer._place(batch)
    n_valid = jnp.maximum(placed["valid"].sum(), 1.0)
    grad_fn = jax.jit(jax.grad(trainer._micro_loss, has_aux=True))
    k = trainer.config.grad_accum_steps
    micro = _split_micro(placed, k)
    parts = [
        grad_fn(trainer._initial_trainable, trainer.frozen, trainer.reference_params,
                jax.tree.map(lambda x: x[j], micro), n_valid)
        for j in range(k)
    ]
    return jax.tree.map(lambda *xs: sum(xs), *parts)


@pytest.mark.parametrize(
    "reference,loss_type,grad_accum,lora",
    [("frozen_copy", "sigmoid", 1, False), ("precomputed", "ipo", 2, False), ("lora_off", "sigmoid", 1, True)],
)
def test_packed_training_equals_padded(reference, loss_type, grad_accum, lora):
    data = _pairs(7, seed=4)
    padded = collate_pairs(data, np.array([0, 1, 2, 3, 4, 5, 6, -1]), 24)
    rng = np.random.default_rng(5)
    padded["ref_chosen_logps"] = rng.normal(-30, 5, 8).astype(np.float32)
    padded["ref_rejected_logps"] = rng.normal(-30, 5, 8).astype(np.float32)

    unpacked_trainer = _trainer(False, reference=reference, loss_type=loss_type, grad_accum=grad_accum, lora=lora)
    packed_trainer = _trainer(True, reference=reference, loss_type=loss_type, grad_accum=grad_accum, lora=lora)
    (g_pad, m_pad) = _grads(unpacked_trainer, padded)
    (g_pack, m_pack) = _grads(packed_trainer, padded)
    assert set(m_pad) == set(m_pack)
    for name in m_pad:
        np.testing.assert_allclose(float(m_pack[name]), float(m_pad[name]), rtol=1e-5, atol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_pack), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_pad)) > 1e-4  # gradients are not all zero

    if grad_accum == 1:
        return
    # The jitted step packs the host batch itself and splits the packed rows into micro-batches.
    _, out_pad = unpacked_trainer.train_step(unpacked_trainer.init_state(), padded)
    _, out_pack = packed_trainer.train_step(packed_trainer.init_state(), padded)
    for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(float(out_pack[name]), float(out_pad[name]), rtol=1e-5, atol=1e-5, err_msg=name)


def test_config_accepts_packing_single_and_multi_host():
    """Each host packs its own rows (tests/test_multihost.py runs packed DPO on two processes)."""
    init = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    config = RunConfig(model=ModelSection(init=init), train=TrainSection(packing=True))
    validate(config, check_files=False)
    config.distributed.num_processes = 2
    validate(config, check_files=False)


def test_packed_sequence_logps_by_hand():
    # Row: [seq 1: 3 tokens][seq 2: 3 tokens][pad]; entry t-1 of per_token scores token t.
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
    loss_mask = jnp.array([[0, 1, 1, 1, 1, 1, 0]])
    per_token = jnp.array([[-1.0, -2.0, jnp.nan, -4.0, -8.0, jnp.nan]])
    sums, means, n = packed_sequence_logps(per_token, loss_mask, segment_ids, num_sequences=3)
    # Token 3 opens segment 2 (predicted from segment 1's last token): never scored, NaN ignored.
    np.testing.assert_array_equal(np.asarray(sums), [-3.0, -12.0, 0.0])
    np.testing.assert_array_equal(np.asarray(n), [2.0, 2.0, 0.0])
    np.testing.assert_array_equal(np.asarray(means), [-1.5, -6.0, 0.0])
