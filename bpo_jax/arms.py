"""Many training arms as one program: parameters stacked on a leading axis, one step for all arms.

A study trains dozens of small arms that share a model shape and a training recipe and differ
only in their pairs and seeds. One jitted step updates every arm (bpo_jax.stacking: `jax.vmap`
over arms, or a loop over arms inside the program, which XLA:CPU runs faster); no per-arm
dispatch, host round trip or compile. Each arm keeps its own data order (its own
PreferenceBatcher), its own PRNG key and its own optimizer state; the learning-rate schedule and
the number of steps are shared. Arm a of the stack follows the trajectory of the same arm trained
alone by the ordinary step (tests/test_arms.py; equal up to float rounding, since a batched matrix
product may sum in another order).

Arms train on one device (the study's arms are small; a mesh would shard each arm, not the arms).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bpo_jax.checkpointing import Checkpointer
from bpo_jax.data.batching import Batch, PreferenceBatcher
from bpo_jax.io_utils import write_json
from bpo_jax.stacking import ArmWeights, over_arms, resolve
from bpo_jax.train import Trainer, TrainState

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "loss_mask")


def stack_trees(trees: Sequence):
    """Pytrees of equal structure -> one pytree whose leaves gain a leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def stack_batches(batches: Sequence[Batch]) -> Batch:
    """The arms' host batches as one batch with a leading arm axis: [A, B, ...].

    Arms may have picked different length buckets; shorter ones are right-padded (ids and masks
    0, exactly how collation pads), which changes no log-prob.
    """
    length = max(b["chosen_input_ids"].shape[1] for b in batches)

    def padded(name: str, x: np.ndarray) -> np.ndarray:
        if name.endswith(_SEQUENCE_KEYS):
            return np.pad(x, ((0, 0), (0, length - x.shape[1])))
        return x

    return {name: np.stack([padded(name, b[name]) for b in batches]) for name in batches[0]}


class ArmsTrainer:
    """`trainer`'s step over stacked arms: arm a starts from initial_params[a] with seed seeds[a].

    `trainer` supplies the graph, the frozen parameters, the optimizer and the loss (its own
    initial parameters are not used). Reference modes: precomputed, lora_off and none work per
    arm; frozen_copy would share the trainer's single copy and is refused. `mode`: how the program
    runs over arms (bpo_jax.stacking: auto, vmap or map).
    """

    def __init__(self, trainer: Trainer, initial_params: Sequence[nnx.State], seeds: Sequence[int], mode: str = "auto"):
        if len(initial_params) != len(seeds) or not seeds:
            raise ValueError(f"need one seed per arm: {len(initial_params)} initial states, {len(seeds)} seeds")
        if trainer.mesh.devices.size != 1:
            raise ValueError(f"arms train on one device; got a mesh of {trainer.mesh.devices.size} devices")
        if getattr(trainer.config, "reference", None) == "frozen_copy":
            raise ValueError("reference 'frozen_copy' keeps one copy for all arms; use precomputed or lora_off")
        if trainer.config.packing:
            raise ValueError("train.packing is not supported for stacked arms (arms would pack differently)")
        self.trainer = trainer
        self.seeds = [int(s) for s in seeds]
        self._initial = list(initial_params)
        self.mode = resolve(mode)

        def step_all(states, frozen, reference_params, batch):
            def one_arm(state, arm_batch):
                return trainer.pure_step(state, frozen, reference_params, arm_batch)

            return over_arms(one_arm, self.mode)(states, batch)

        self._step = jax.jit(step_all, donate_argnums=(0,))

    @property
    def num_arms(self) -> int:
        return len(self.seeds)

    def init_state(self) -> TrainState:
        """Every arm's step-0 state (as Trainer.init_state builds one), stacked."""
        tx = self.trainer.tx
        return stack_trees([
            TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=jax.random.PRNGKey(seed))
            for p, seed in zip(self._initial, self.seeds)
        ])

    def train_step(self, state: TrainState, batches: Sequence[Batch]) -> tuple[TrainState, dict[str, np.ndarray]]:
        """One optimizer step of every arm; batches[a] is arm a's host batch. Metrics are [A] arrays."""
        if len(batches) != self.num_arms:
            raise ValueError(f"{len(batches)} batches for {self.num_arms} arms")
        batch = {k: jnp.asarray(v) for k, v in stack_batches(batches).items()}
        state, metrics = self._step(state, self.trainer.frozen, self.trainer.reference_params, batch)
        return state, {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}

    def weights(self, state: TrainState) -> ArmWeights:
        """The arms' models as stacked weights (for `sampling.generate(..., arms=...)`)."""
        return ArmWeights(self.trainer.graphdef, state.params, self.trainer.frozen, self.mode)

    def model_of(self, state: TrainState, arm: int):
        """Arm `arm`'s model (for export or single-model evaluation)."""
        params = jax.tree.map(lambda x: x[arm], state.params)
        return nnx.merge(self.trainer.graphdef, params, self.trainer.frozen)


def fit_arms(
    arms: ArmsTrainer,
    batchers: Sequence[PreferenceBatcher],
    *,
    run_dir: str | Path,
    num_steps: int,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> tuple[TrainState, list[list[dict[str, float]]]]:
    """Train every arm `num_steps` steps, arm a on batchers[a]; resumes from run_dir/checkpoints.

    Returns the final stacked state and metrics[a][step] (what `fit` logs, per arm). The metrics
    so far are saved before every checkpoint (metrics.json), so a resumed run returns them all.
    """
    if len(batchers) != arms.num_arms:
        raise ValueError(f"{len(batchers)} batchers for {arms.num_arms} arms")
    run_dir = Path(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=1)
    state = arms.init_state()
    history: list[list[dict[str, float]]] = [[] for _ in range(arms.num_arms)]
    start = 0
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        for batcher, saved in zip(batchers, data_state["arms"]):
            batcher.set_state(saved)
        start = int(np.asarray(state.step)[0])
        history = [arm[:start] for arm in json.loads((run_dir / "metrics.json").read_text())]
    bar = tqdm(total=num_steps, initial=start, desc=f"training {arms.num_arms} arms", unit="step", disable=not progress)
    try:
        for step in range(start + 1, num_steps + 1):
            state, metrics = arms.train_step(state, [next(b) for b in batchers])
            for a in range(arms.num_arms):
                history[a].append({"step": step, **{k: float(v[a]) for k, v in metrics.items()}})
            bar.update(1)
            bar.set_postfix(loss=f"{float(np.mean(metrics['loss'])):.4f}")
            if step == num_steps or (checkpoint_every and step % checkpoint_every == 0):
                write_json(run_dir / "metrics.json", history)  # first: it may run ahead, never behind
                checkpointer.save(step, state, {"arms": [b.get_state() for b in batchers]})
    finally:
        bar.close()
        checkpointer.close()
    return state, history
