"""The DPO/SFT trainers on tiny random models: learning, sharding, accumulation, reference modes,
metrics and the compiled memory of the lora_off reference.

Every model here is a randomly initialized Llama-family CausalLM of a few thousand parameters, so
each test costs about one XLA compile per trainer. Tolerances are stated where results are not
bitwise: fp32 sums reordered by a different mesh or micro-batching differ by ~1e-7 relative.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bpo_jax.config import LoraSection, OptimSection, TrainSection
from bpo_jax.data.batching import PreferenceBatcher, collate_pairs
from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.sharding import make_mesh, param_partition_spec, shard_model
from bpo_jax.train import DPOTrainer, SFTTrainer, fit, precompute_reference_logps

# Dimensions divide by 4 (fsdp) and 2 (tensor), so the partition rules really split parameters.
TINY = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
)
EOS, PAD = 1, 0


def one_device_mesh():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def pairs(prompts, chosen, rejected, max_length=16) -> TokenizedPairs:
    n = len(prompts)
    return TokenizedPairs(
        prompt=RaggedTokens.from_lists(prompts),
        chosen=RaggedTokens.from_lists(chosen, append=EOS),
        rejected=RaggedTokens.from_lists(rejected, append=EOS),
        ids=np.array([f"p{i}" for i in range(n)]),
        source_index=np.arange(n),
        max_length=max_length,
        pad_id=PAD,
    )


def random_pairs(n: int, seed: int = 0) -> TokenizedPairs:
    """Random ids of random lengths: chosen and rejected differ in content and length."""
    rng = np.random.default_rng(seed)

    def seqs(lo, hi):
        return [rng.integers(2, TINY.vocab_size, size=rng.integers(lo, hi)).tolist() for _ in range(n)]

    return pairs(seqs(2, 6), seqs(1, 6), seqs(1, 6))


def rule_pairs(n: int, seed: int) -> TokenizedPairs:
    """A learnable preference: chosen responses use ids 2..9, rejected ones ids 10..17."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(18, 32, size=3).tolist() for _ in range(n)]
    chosen = [rng.integers(2, 10, size=4).tolist() for _ in range(n)]
    rejected = [rng.integers(10, 18, size=4).tolist() for _ in range(n)]
    return pairs(prompts, chosen, rejected)


def train_config(**overrides) -> TrainSection:
    # Adam eps 1e-6 (not 1e-8): Adam divides by |g| + eps, which would blow fp32 reduction-order
    # noise in near-zero gradient entries up to lr-sized parameter differences between layouts.
    optim = OptimSection(learning_rate=1e-3, schedule="constant", max_grad_norm=1.0, eps=1e-6)
    return TrainSection(**{"reference": "frozen_copy", "batch_size": 8, "optim": optim, **overrides})


def first_batch(data: TokenizedPairs, batch_size: int = 8) -> dict[str, np.ndarray]:
    return next(PreferenceBatcher(data, batch_size, shuffle=False, buckets=(data.max_length,)))


def tree_max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_steps(trainer, batches) -> tuple:
    state = trainer.init_state()
    history = []
    for batch in batches:
        state, metrics = trainer.train_step(state, batch)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return state, history


def numpy_sequence_logps(logits: np.ndarray, ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Summed response log-probs, float64, written out position by position."""
    logits = logits.astype(np.float64)
    out = np.zeros(ids.shape[0])
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if loss_mask[b, t]:
                row = logits[b, t - 1]
                out[b] += row[ids[b, t]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    return out


def model_logps(model, batch) -> tuple[np.ndarray, np.ndarray]:
    """NumPy summed log-probs of chosen and rejected under `model` (forward in JAX, rest NumPy)."""
    out = []
    for side in ("chosen", "rejected"):
        ids, att, mask = (np.asarray(batch[f"{side}_{k}"]) for k in ("input_ids", "attention_mask", "loss_mask"))
        out.append(numpy_sequence_logps(np.asarray(model(jnp.asarray(ids), jnp.asarray(att))), ids, mask))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# 1. It learns
# ---------------------------------------------------------------------------------------------


def test_dpo_learns_a_synthetic_preference():
    """30 steps of DPO on 32 rule-following pairs: accuracy > 0.9 on held-out pairs, margin up."""
    train, held_out = rule_pairs(32, seed=0), rule_pairs(16, seed=1)
    cfg = train_config(beta=0.1, optim=OptimSection(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0))
    trainer = DPOTrainer(init_model(TINY, seed=0), cfg, one_device_mesh(), total_steps=30)
    batcher = PreferenceBatcher(train, 8, seed=0, buckets=(16,))
    state, history = run_steps(trainer, [next(batcher) for _ in range(30)])

    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 1
    last = history[-4:]  # the last epoch, measured before each update
    assert min(h["rewards/accuracies"] for h in last) > 0.9
    assert np.mean([h["rewards/margins"] for h in last]) > 1.0 > abs(history[0]["rewards/margins"])
    assert np.mean([h["loss"] for h in last]) < 0.5 * np.log(2)

    # Held-out pairs from the same rule, scored independently: beta * (policy - reference) log-probs.
    policy, reference = trainer.model_at(state), init_model(TINY, seed=0)
    right = []
    for rows in (np.arange(8), np.arange(8, 16)):
        batch = collate_pairs(held_out, rows, 16)
        (pc, pr), (rc, rr) = model_logps(policy, batch), model_logps(reference, batch)
        right.extend(cfg.beta * (pc - rc) > cfg.beta * (pr - rr))
    accuracy = np.mean(right)
    assert accuracy > 0.9


# ---------------------------------------------------------------------------------------------
# Shared runs. Each XLA compile of a train step costs seconds on CPU, so the trainers that several
# tests compare against run once per module. The memory analysis re-lowers these same steps
# (same shapes and shardings), which hits the compilation cache.
# ---------------------------------------------------------------------------------------------

STEPS_DATA = random_pairs(13, seed=3)


def three_batches(data: TokenizedPairs) -> list[dict]:
    """8 full rows, then 5 real rows + 3 filler rows (twice): the filler rows must not count."""
    batcher = PreferenceBatcher(data, 8, shuffle=False, buckets=(16,))
    return [batcher.batch_at(0, 0), batcher.batch_at(0, 1), batcher.batch_at(0, 1)]


@pytest.fixture(scope="module")
def baseline():
    """Full fine-tuning, frozen_copy reference, one device, no accumulation: 3 steps."""
    trainer = DPOTrainer(init_model(TINY, seed=0), train_config(), one_device_mesh(), total_steps=3)
    state, history = run_steps(trainer, three_batches(STEPS_DATA))
    return trainer, state, history


LORA = LoraSection(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
LORA_DATA = random_pairs(16, seed=5)
LORA_BETA = 0.5


def lora_batches() -> list[dict]:
    batcher = PreferenceBatcher(LORA_DATA, 8, seed=2, buckets=(16,))
    return [next(batcher) for _ in range(4)] + [batcher.batch_at(0, 0)]


@pytest.fixture(scope="module")
def lora_runs():
    """Five LoRA steps with each on-the-fly reference: {mode: (trainer, state, history)}."""
    runs = {}
    for mode in ("frozen_copy", "lora_off"):
        trainer = lora_trainer(mode, one_device_mesh())
        runs[mode] = (trainer, *run_steps(trainer, lora_batches()))
    return runs


def lora_trainer(reference: str, mesh) -> DPOTrainer:
    model = shard_model(add_lora(init_model(TINY, seed=0), LORA, seed=0), mesh)
    cfg = train_config(reference=reference, beta=LORA_BETA, optim=OptimSection(learning_rate=3e-2, schedule="constant"))
    return DPOTrainer(model, cfg, mesh, total_steps=5)


SIMPO_DATA = rule_pairs(16, seed=6)


@pytest.fixture(scope="module")
def simpo_run():
    """Reference-free SimPO on a LoRA model: 10 steps."""
    cfg = train_config(reference="none", loss_type="simpo", beta=2.0, gamma=0.5,
                       optim=OptimSection(learning_rate=3e-2, schedule="constant"))
    trainer = DPOTrainer(add_lora(init_model(TINY, seed=0), LORA, seed=0), cfg, one_device_mesh(), total_steps=10)
    batcher = PreferenceBatcher(SIMPO_DATA, 8, seed=0, buckets=(16,))
    batches = [next(batcher) for _ in range(10)]
    return (trainer, *run_steps(trainer, batches), batches)


# ---------------------------------------------------------------------------------------------
# 2. Meshes
# ---------------------------------------------------------------------------------------------


def test_train_step_same_params_on_every_mesh(baseline):
    """Three steps on meshes (8,1,1), (2,4,1), (2,2,2) equal the one-device run, params sharded
    by the partition rules after every step, one compile for all steps.

    Tolerance: |dparam| <= 1e-6 (0.1% of one Adam step at lr 1e-3), metrics 1e-5 relative.
    """
    _, reference, ref_history = baseline
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = make_mesh(shape)
        trainer = DPOTrainer(shard_model(init_model(TINY, seed=0), mesh), train_config(), mesh, total_steps=3)
        state, history = run_steps(trainer, three_batches(STEPS_DATA))
        assert trainer._step._cache_size() == 1, shape  # steps 2-3 reused step 1's program
        assert tree_max_abs_diff(state.params, reference.params) < 1e-6, shape
        assert tree_max_abs_diff(state.opt_state, reference.opt_state) < 1e-6, shape
        for step, (got, want) in enumerate(zip(history, ref_history)):
            for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
                assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (shape, step, name)
        split = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
            names = [getattr(k, "key", getattr(k, "name", None)) for k in path][:-1]  # drop ".value"
            expected = jax.sharding.NamedSharding(mesh, param_partition_spec(names, leaf.shape, mesh))
            assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (shape, names, leaf.sharding.spec)
            split += leaf.addressable_shards[0].data.shape != leaf.shape
        if shape != (8, 1, 1):  # (8,1,1) is pure data parallelism: every parameter replicated
            assert split >= 8, shape  # embeddings and every projection kernel really are split


def test_lora_steps_same_on_a_mesh(lora_runs):
    """LoRA with the lora_off reference, five steps on a (2,2,2) mesh, equals the one-device run:
    adapters and frozen base sharded by the same rules.

    Tolerance: as above, 0.1% of one Adam step: |dparam| <= 3e-5 at lr 3e-2 (measured 8e-6).
    """
    _, reference, ref_history = lora_runs["lora_off"]
    trainer = lora_trainer("lora_off", make_mesh((2, 2, 2)))
    state, history = run_steps(trainer, lora_batches())
    assert tree_max_abs_diff(state.params, reference.params) < 3e-5
    for step, (got, want) in enumerate(zip(history, ref_history)):
        for name in ("loss", "grad_norm", "rewards/margins"):
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (step, name)
    assert any(leaf.addressable_shards[0].data.shape != leaf.shape for leaf in jax.tree.leaves(trainer.frozen))


# ---------------------------------------------------------------------------------------------
# 3. Gradient accumulation
# ---------------------------------------------------------------------------------------------


def test_grad_accumulation_equals_full_batch(baseline):
    """k = 4 micro-batches of 2 rows == one step on the whole batch of 8, over 3 steps.

    In the batches with 3 filler rows the micro-batches hold 2, 1, 1 and 1 valid rows, so the loss
    must be normalized by the valid rows of the whole batch, not of each micro-batch.
    """
    _, full, full_history = baseline
    trainer = DPOTrainer(init_model(TINY, seed=0), train_config(grad_accum_steps=4), one_device_mesh(), total_steps=3)
    accum, accum_history = run_steps(trainer, three_batches(STEPS_DATA))
    assert tree_max_abs_diff(accum.params, full.params) < 1e-6
    for a, f in zip(accum_history, full_history):
        for name in f:
            assert a[name] == pytest.approx(f[name], rel=1e-5, abs=1e-6), name


def test_grad_accumulation_must_divide_the_batch():
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps"):
        DPOTrainer(init_model(TINY), train_config(grad_accum_steps=3), one_device_mesh(), total_steps=1)


# ---------------------------------------------------------------------------------------------
# 5. Reference modes
# ---------------------------------------------------------------------------------------------


def loss_and_grads(trainer, params, batch):
    """The step's own objective and gradient at `params` (no optimizer), for direct comparison."""
    batch = trainer._place(batch)
    n_valid = jnp.maximum(batch["valid"].sum(), 1.0)
    fn = jax.jit(jax.value_and_grad(trainer._micro_loss, has_aux=True))
    (loss, _), grads = fn(params, trainer.frozen, trainer.reference_params, batch, n_valid)
    return float(loss), grads


def test_precomputed_reference_equals_frozen_copy(baseline):
    """Reference log-probs computed once (precompute_reference_logps, in another order) give the
    same loss, gradients and 3-step training as the on-the-fly frozen copy.
    Tolerance 1e-5 relative (the reference forward runs in a different XLA program)."""
    mesh = one_device_mesh()
    shuffled = PreferenceBatcher(STEPS_DATA, 8, seed=5, buckets=(16,)).epoch_batches()
    index, chosen, rejected = precompute_reference_logps(init_model(TINY, seed=0), shuffled, mesh)
    order = np.argsort(index)
    np.testing.assert_array_equal(index[order], np.arange(len(STEPS_DATA)))
    with_ref = STEPS_DATA.with_ref_logps(chosen[order], rejected[order])
    rc, rr = model_logps(init_model(TINY, seed=0), collate_pairs(STEPS_DATA, np.arange(8), 16))
    np.testing.assert_allclose(with_ref.ref_chosen_logps[:8], rc, rtol=1e-5)
    np.testing.assert_allclose(with_ref.ref_rejected_logps[:8], rr, rtol=1e-5)

    frozen_trainer, state_f, hist_f = baseline
    trainer = DPOTrainer(init_model(TINY, seed=0), train_config(reference="precomputed"), mesh, total_steps=3)
    assert trainer.reference_params is None  # no reference params held at all
    batches = three_batches(with_ref)
    assert "ref_chosen_logps" in batches[0]
    # Gradients at a policy away from the reference (another init), where the reference matters.
    params = nnx.state(init_model(TINY, seed=1), nnx.Param)
    loss_f, grads_f = loss_and_grads(frozen_trainer, params, three_batches(STEPS_DATA)[1])
    loss_p, grads_p = loss_and_grads(trainer, params, batches[1])
    assert abs(loss_f - np.log(2)) > 1e-3  # the other-init policy really differs from the reference
    assert loss_p == pytest.approx(loss_f, rel=1e-5)
    assert tree_max_abs_diff(grads_p, grads_f) < 1e-5 * max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_f))

    state_p, hist_p = run_steps(trainer, batches)
    for step, (p, f) in enumerate(zip(hist_p, hist_f)):
        for name in f:
            if step == 0 and name == "rewards/accuracies":
                continue  # policy == reference: rewards are +-1e-8 noise, "chosen > rejected" a coin flip
            assert p[name] == pytest.approx(f[name], rel=1e-4, abs=1e-5), (step, name)
    assert tree_max_abs_diff(state_p.params, state_f.params) < 1e-6


def test_lora_off_reference_is_the_base_model(lora_runs):
    """lora_off == frozen_copy of the un-adapted base: same 5-step LoRA training (so the same
    losses and gradient norms), and its reference log-probs after the adapters moved equal those
    of a plain model without LoRA."""
    (_, state_f, hist_f), (_, state_l, hist_l) = lora_runs["frozen_copy"], lora_runs["lora_off"]
    assert tree_max_abs_diff(state_l.params, state_f.params) < 1e-6
    for f, lo in zip(hist_f, hist_l):
        for name in f:
            assert lo[name] == pytest.approx(f[name], rel=1e-5, abs=1e-6), name
    # The adapters moved (a reference following the policy would keep every margin at 0).
    assert abs(hist_l[-1]["rewards/margins"]) > 1e-2
    # Reference log-probs of the last step, recovered from its metrics: mean(ref) = mean(policy)
    # - mean(reward) / beta, against a plain base model scored in NumPy.
    rc, rr = model_logps(init_model(TINY, seed=0), lora_batches()[-1])
    last = hist_l[-1]
    assert last["logps/chosen"] - last["rewards/chosen"] / LORA_BETA == pytest.approx(rc.mean(), rel=1e-5)
    assert last["logps/rejected"] - last["rewards/rejected"] / LORA_BETA == pytest.approx(rr.mean(), rel=1e-5)


def test_reference_none_trains_simpo(simpo_run):
    """Reference-free SimPO: first-step loss equals -logsigmoid(beta (avg_pc - avg_pr) - gamma)
    from NumPy length-averaged log-probs of the (adapter-free at step 0) model; training lowers it."""
    trainer, _, history, batches = simpo_run
    assert trainer.reference_params is None
    pc, pr = model_logps(init_model(TINY, seed=0), batches[0])
    nc, nr = batches[0]["chosen_loss_mask"][:, 1:].sum(1), batches[0]["rejected_loss_mask"][:, 1:].sum(1)
    x = 2.0 * (pc / nc - pr / nr) - 0.5
    assert history[0]["loss"] == pytest.approx(np.mean(np.logaddexp(0, -x)), rel=1e-5)
    assert history[0]["rewards/chosen"] == pytest.approx(np.mean(2.0 * pc / nc), rel=1e-5)
    # Rank-4 adapters from B = 0 move slowly: 10 steps take the loss from 0.96 to about 0.8.
    assert np.mean([h["loss"] for h in history[-3:]]) < 0.9 * history[0]["loss"]


def test_precomputed_reference_needs_reference_logps():
    trainer = DPOTrainer(init_model(TINY), train_config(reference="precomputed"), one_device_mesh(), total_steps=1)
    with pytest.raises(ValueError, match="needs batches with ref_chosen_logps"):
        trainer.train_step(trainer.init_state(), first_batch(random_pairs(8)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reference": "none", "loss_type": "sigmoid"}, "reference-free"),
        ({"reference": "lora_off"}, "needs a LoRA model"),
        ({"reference": "shared"}, "unknown reference"),
    ],
)
def test_reference_mode_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOTrainer(init_model(TINY), train_config(**kwargs), one_device_mesh(), total_steps=1)


def compiled_memory(trainer, state, batch):
    """XLA's memory analysis of the trainer's compiled step for these argument shapes."""
    return trainer.lower_step(state, batch).compile().memory_analysis()


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_lora_off_allocates_no_second_parameter_copy(baseline, lora_runs, simpo_run):
    """From XLA's memory analysis of the compiled steps: lora_off's arguments and scratch (temp)
    equal those of the reference-free step, i.e. its reference costs no parameter copy, while
    frozen_copy carries an extra copy of the trainable params (the adapters with LoRA, every
    parameter without)."""
    batch = lora_batches()[0]
    (lo_trainer, lo_state, _), (fc_trainer, fc_state, _) = lora_runs["lora_off"], lora_runs["frozen_copy"]
    lora_off = compiled_memory(lo_trainer, lo_state, batch)
    frozen_lora = compiled_memory(fc_trainer, fc_state, batch)
    no_ref = compiled_memory(simpo_run[0], simpo_run[1], batch)
    full_trainer, full_state, _ = baseline
    frozen_full = compiled_memory(full_trainer, full_state, batch)

    base, adapters = nbytes(lo_trainer.frozen), nbytes(lo_state.params)
    print(
        f"\nbase params {base} B, adapters {adapters} B | argument/temp bytes: "
        f"lora_off {lora_off.argument_size_in_bytes}/{lora_off.temp_size_in_bytes}, "
        f"none {no_ref.argument_size_in_bytes}/{no_ref.temp_size_in_bytes}, "
        f"frozen_copy+LoRA {frozen_lora.argument_size_in_bytes}/{frozen_lora.temp_size_in_bytes}, "
        f"frozen_copy full {frozen_full.argument_size_in_bytes}/{frozen_full.temp_size_in_bytes}"
    )
    # Arguments: exactly the reference-free step's (no reference array passed in) ...
    assert lora_off.argument_size_in_bytes == no_ref.argument_size_in_bytes
    assert frozen_lora.argument_size_in_bytes - lora_off.argument_size_in_bytes == adapters
    # (jit prunes unused inputs such as example_index, hence "within the batch's bytes")
    extra = frozen_full.argument_size_in_bytes - nbytes(full_state) - nbytes(batch)
    assert abs(extra - nbytes(full_state.params)) <= nbytes(batch)
    # ... and scratch within a sliver of it: a copy of the base would add `base` bytes.
    assert lora_off.temp_size_in_bytes - no_ref.temp_size_in_bytes < base / 10


# ---------------------------------------------------------------------------------------------
# 6. Metrics
# ---------------------------------------------------------------------------------------------


def test_metrics_jsonl_match_numpy(tmp_path):
    """fit() for one step writes TRL-named metrics equal to a NumPy computation over valid rows."""
    data = random_pairs(5, seed=7)
    # Reference log-probs near the policy's, so some implicit rewards come out right, some wrong.
    padded = collate_pairs(data, np.r_[0:5, -1, -1, -1], 16)  # the batch shape used everywhere
    pc, pr = (x[:5] for x in model_logps(init_model(TINY, seed=0), padded))
    data = data.with_ref_logps(pc + np.array([1.5, -1.0, 2.0, -0.5, -3.0]), pr - 0.25)
    beta = 0.2
    cfg = train_config(reference="precomputed", beta=beta)
    trainer = DPOTrainer(init_model(TINY, seed=0), cfg, one_device_mesh(), total_steps=1)
    batcher = PreferenceBatcher(data, 8, shuffle=False, buckets=(16,))
    batch = batcher.batch_at(0, 0)
    assert batch["valid"].sum() == 5  # three filler rows that must not count
    fit(trainer, batcher, run_dir=tmp_path, num_steps=1, name="dpo")

    rows = [json.loads(line) for line in (tmp_path / "dpo_metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 1
    got = rows[0]
    keep = batch["valid"] > 0
    pc, pr = (x[keep] for x in model_logps(init_model(TINY, seed=0), batch))
    rc, rr = batch["ref_chosen_logps"][keep].astype(np.float64), batch["ref_rejected_logps"][keep].astype(np.float64)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    expected = {
        "loss": np.mean(np.logaddexp(0, -(chosen - rejected))),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": np.mean(chosen > rejected),
        "rewards/margins": np.mean(chosen - rejected),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
        "learning_rate": cfg.optim.learning_rate,
    }
    assert 0 < expected["rewards/accuracies"] < 1  # a non-trivial mix of right and wrong rows
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
    assert got["tokens_per_second"] * got["step_time"] == pytest.approx(tokens, rel=1e-6)
    assert got["grad_norm"] > 0
    assert (tmp_path / "dpo_curves.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard" / "dpo").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# 7. SFT
# ---------------------------------------------------------------------------------------------


def test_sft_trains_response_tokens_only():
    """SFTTrainer's loss is the mean over examples of the per-token cross-entropy of response
    tokens (NumPy check), and training lowers it while the cross-entropy of the (random) prompt
    tokens, masked out of the loss, stays where it was."""
    rng = np.random.default_rng(9)
    prompts = [rng.integers(18, 32, size=rng.integers(3, 7)).tolist() for _ in range(8)]
    responses = [[2 + i % 4, 3 + i % 4, 4 + i % 4] for i in range(8)]
    batch = first_batch(pairs(prompts, responses, responses))
    cfg = train_config(optim=OptimSection(learning_rate=1e-2, schedule="constant"))
    trainer = SFTTrainer(init_model(TINY, seed=0), cfg, one_device_mesh(), total_steps=20)
    state, history = run_steps(trainer, [batch] * 20)

    ids, att, response = batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_loss_mask"]
    prompt = att - response
    prompt[:, 0] = 0  # position 0 is never predicted

    def mean_ce(model, mask):
        logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(att)))
        return np.mean(-numpy_sequence_logps(logits, ids, mask) / mask[:, 1:].sum(1))

    before, after = init_model(TINY, seed=0), trainer.model_at(state)
    assert history[0]["loss"] == pytest.approx(mean_ce(before, response), rel=1e-5)
    assert mean_ce(after, response) < 0.3 * mean_ce(before, response)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert mean_ce(after, prompt) > 0.9 * mean_ce(before, prompt)
