"""Stacked arms (bpo_jax.arms, bpo_jax.stacking): arms trained and sampled together as one program,
vmapped or looped over arms, equal each arm trained and sampled alone.

The reference is the ordinary single-arm path (DPOTrainer.train_step over the arm's own
PreferenceBatcher; sampling.generate with the arm's own model). Tolerance: 1e-5 relative on
losses and parameters after 6 steps (a batched matrix product may sum in another order; Adam eps
1e-6 keeps rounding noise in near-zero gradients from being amplified).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bpo_jax.arms import ArmsTrainer, fit_arms, stack_batches
from bpo_jax.config import LoraSection
from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.models.llama import init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.sampling import SamplingConfig, generate
from bpo_jax.train import DPOTrainer, TrainState, precompute_reference_logps, trainable_filter
from tests.test_train import TINY, one_device_mesh, random_pairs, rule_pairs, train_config

STEPS = 6


def with_reference(model, data):
    batches = PreferenceBatcher(data, 8, shuffle=False).epoch_batches()
    index, chosen, rejected = precompute_reference_logps(model, batches, one_device_mesh())
    order = np.argsort(index)
    return data.with_ref_logps(chosen[order], rejected[order])


def arm_setup(lora: bool):
    """Three arms: different data (sizes 12, 20, 9 pairs: different epoch lengths) and seeds."""
    cfg = train_config(reference="lora_off" if lora else "precomputed")
    datasets = [rule_pairs(12, 1), random_pairs(20, 2), rule_pairs(9, 3)]
    seeds = [0, 5, 7]
    if not lora:
        base = init_model(TINY, seed=0)
        datasets = [with_reference(base, d) for d in datasets]
    return cfg, datasets, seeds


def fresh_model(lora: bool, seed: int):
    model = init_model(TINY, seed=0)
    if lora:
        add_lora(model, LoraSection(rank=2, alpha=4.0, targets=(".*",)), seed=seed)
    return model


@pytest.fixture(scope="module", params=[(False, "vmap"), (False, "map"), (True, "map")], ids=["full-vmap", "full-map", "lora-map"])
def runs(request):
    lora, mode = request.param
    cfg, datasets, seeds = arm_setup(lora)
    models = [fresh_model(lora, seed) for seed in seeds]
    initial = [nnx.split(m, trainable_filter(m), ...)[1] for m in models]
    # Alone: the ordinary jitted step of one trainer, arm a's own start state, seed and batches.
    trainer = DPOTrainer(fresh_model(lora, 0), cfg, one_device_mesh(), total_steps=STEPS)
    alone = []
    for params, data, seed in zip(initial, datasets, seeds):
        params = jax.tree.map(jnp.copy, params)  # the step donates its state; the arms need these later
        state = TrainState(jnp.zeros((), jnp.int32), params, trainer.tx.init(params), jax.random.PRNGKey(seed))
        batches = PreferenceBatcher(data, 8, seed=seed)
        losses = []
        for _ in range(STEPS):
            state, metrics = trainer.train_step(state, next(batches))
            losses.append(float(metrics["loss"]))
        alone.append((losses, jax.device_get(state.params), trainer.model_at(state)))
    arms = ArmsTrainer(trainer, initial, seeds, mode=mode)
    assert arms.mode == mode
    state = arms.init_state()
    batchers = [PreferenceBatcher(d, 8, seed=s) for d, s in zip(datasets, seeds)]
    together = []
    for _ in range(STEPS):
        state, metrics = arms.train_step(state, [next(b) for b in batchers])
        together.append(metrics["loss"])
    return alone, np.array(together), arms, state, lora


def test_stacked_arms_follow_each_arm_trained_alone(runs):
    alone, together, _, state, _ = runs
    for a, (losses, params, _) in enumerate(alone):
        np.testing.assert_allclose(together[:, a], losses, rtol=1e-5, atol=1e-6)
        stacked = jax.tree.map(lambda x: np.asarray(x[a]), state.params)
        for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(params)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(together[:, 0], together[:, 1])  # the arms really differ


def test_stacked_arms_sample_what_each_arm_samples_alone(runs):
    alone, _, arms, state, lora = runs
    cfg = SamplingConfig(n=3, temperature=1.0, max_new_tokens=5, batch_size=2, seed=11)
    prompts = [[20, 21, 22], [25, 26], [30, 31, 19, 18], [22]]
    together = generate(alone[0][2], prompts, cfg, arms=arms.weights(state), progress=False)
    assert len(together) == 3
    for result, (_, _, model) in zip(together, alone):
        single = generate(model, prompts, cfg, progress=False)
        assert result.tokens == single.tokens
        np.testing.assert_array_equal(result.finished, single.finished)
    if not lora:  # 6 small steps barely move fresh LoRA adapters: their samples may coincide
        assert together[0].tokens != together[1].tokens


def test_stack_batches_pads_shorter_buckets():
    short = {"chosen_input_ids": np.ones((2, 4), np.int32), "rejected_loss_mask": np.ones((2, 4), np.int32), "valid": np.ones(2)}
    long = {"chosen_input_ids": np.full((2, 8), 3, np.int32), "rejected_loss_mask": np.ones((2, 8), np.int32), "valid": np.zeros(2)}
    out = stack_batches([short, long])
    assert out["chosen_input_ids"].shape == (2, 2, 8) and out["valid"].shape == (2, 2)
    np.testing.assert_array_equal(out["chosen_input_ids"][0], np.pad(np.ones((2, 4)), ((0, 0), (0, 4))))
    np.testing.assert_array_equal(out["rejected_loss_mask"][0, :, 4:], 0)


def test_fit_arms_resumes_to_the_uninterrupted_result(tmp_path):
    cfg, datasets, seeds = arm_setup(lora=False)

    models = [fresh_model(False, s) for s in seeds]
    template = DPOTrainer(models[0], cfg, one_device_mesh(), total_steps=STEPS)
    arms = ArmsTrainer(template, [nnx.split(m, nnx.Param, ...)[1] for m in models], seeds)  # reusable: init_state copies

    def batchers():
        return [PreferenceBatcher(d, 8, seed=s) for d, s in zip(datasets, seeds)]

    straight, history = fit_arms(arms, batchers(), run_dir=tmp_path / "a", num_steps=STEPS, progress=False)
    fit_arms(arms, batchers(), run_dir=tmp_path / "b", num_steps=STEPS // 2, progress=False)
    resumed, resumed_history = fit_arms(arms, batchers(), run_dir=tmp_path / "b", num_steps=STEPS, checkpoint_every=2, progress=False)
    for got, want in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert [m["loss"] for m in resumed_history[1]] == [m["loss"] for m in history[1]]
    assert [m["step"] for m in resumed_history[2]] == list(range(1, STEPS + 1))


def test_arms_refuse_what_they_cannot_do():
    model = init_model(TINY, seed=0)
    trainer = DPOTrainer(model, train_config(reference="frozen_copy"), one_device_mesh(), total_steps=2)
    params = nnx.split(model, nnx.Param, ...)[1]
    with pytest.raises(ValueError, match="frozen_copy"):
        ArmsTrainer(trainer, [params], [0])
    with pytest.raises(ValueError, match="one seed per arm"):
        ArmsTrainer(trainer, [params, params], [0])
    lora_off = DPOTrainer(init_model(TINY, seed=0), train_config(reference="precomputed"), one_device_mesh(), total_steps=2)
    with pytest.raises(ValueError, match="unknown arm mode 'pmap'"):
        ArmsTrainer(lora_off, [params], [0], mode="pmap")
    assert ArmsTrainer(lora_off, [params], [0]).mode == "map"  # auto on CPU (bpo_jax.stacking)
