"""Resume: 10 steps straight == 5 steps, then a NEW PROCESS restoring the orbax checkpoint, 5 more.

Both runs use a (2,2,2) mesh of the 8 emulated CPU devices (sharded save and restore), a shuffled
batcher whose epoch (3 batches, the last one with filler rows) ends mid-run, warmup + cosine
decay (the step counter drives the learning rate) and Adam (moments must come back). The
expectation is bitwise equality of params, optimizer state, RNG and every logged metric except
wall-clock ones: the resumed process compiles the same program for the same inputs.

Run as a script, this file is the second process: `python test_checkpoint_resume.py RUN_DIR`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from bpo_jax.checkpointing import Checkpointer
from bpo_jax.config import OptimSection, TrainSection
from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.sharding import make_mesh, shard_model
from bpo_jax.train import DPOTrainer, fit

TOTAL_STEPS, HALF = 10, 5
WALL_CLOCK = ("step_time", "tokens_per_second")


def build() -> tuple[DPOTrainer, PreferenceBatcher]:
    """The same run, built from scratch in any process."""
    config = ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=4,
    )
    rng = np.random.default_rng(0)

    def seqs(lo, hi):
        return [rng.integers(2, 32, size=rng.integers(lo, hi)).tolist() for _ in range(20)]

    data = TokenizedPairs(
        prompt=RaggedTokens.from_lists(seqs(2, 6)),
        chosen=RaggedTokens.from_lists(seqs(1, 6), append=1),
        rejected=RaggedTokens.from_lists(seqs(1, 6), append=1),
        ids=np.array([f"p{i}" for i in range(20)]),
        source_index=np.arange(20),
        max_length=16,
        pad_id=0,
    )
    mesh = make_mesh((2, 2, 2))
    train = TrainSection(
        reference="frozen_copy",
        batch_size=8,
        optim=OptimSection(learning_rate=1e-2, schedule="cosine", warmup_steps=2),
    )
    trainer = DPOTrainer(shard_model(init_model(config, seed=0), mesh), train, mesh, total_steps=TOTAL_STEPS)
    return trainer, PreferenceBatcher(data, 8, seed=3, buckets=(16,))


def run(run_dir: Path, num_steps: int, checkpoint_every: int = 0):
    trainer, batches = build()
    return fit(trainer, batches, run_dir=run_dir, num_steps=num_steps, checkpoint_every=checkpoint_every)


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = run(straight_dir, TOTAL_STEPS, checkpoint_every=HALF)
    run(resumed_dir, HALF)

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # XLA_FLAGS (8 devices) is inherited from conftest
    done = subprocess.run(
        [sys.executable, __file__, str(resumed_dir)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    target = build()[0].init_state()  # shapes, dtypes and shardings to restore onto
    resumed, data_state = Checkpointer(resumed_dir / "checkpoints").restore(target)
    assert int(resumed.step) == TOTAL_STEPS
    for name in ("params", "opt_state", "rng"):
        a, b = getattr(straight, name), getattr(resumed, name)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    # 10 batches of a 3-batch epoch: the iterator stands at epoch 3, position 1 in both runs.
    assert (data_state["epoch"], data_state["position"]) == (3, 1)
    _, straight_data = Checkpointer(straight_dir / "checkpoints").restore(target, step=TOTAL_STEPS)
    assert straight_data == data_state
    # The straight run's step-5 checkpoint was written asynchronously while step 6 already ran on
    # the donated state: it must still equal the one the 5-step run wrote at its end.
    mid_straight, _ = Checkpointer(straight_dir / "checkpoints").restore(target, step=HALF)
    mid_half, _ = Checkpointer(resumed_dir / "checkpoints").restore(target, step=HALF)
    for x, y in zip(jax.tree.leaves(mid_straight), jax.tree.leaves(mid_half), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    expected, got = metrics(straight_dir), metrics(resumed_dir)
    assert [r["step"] for r in got] == list(range(1, TOTAL_STEPS + 1))
    assert got == expected  # bitwise: the JSON floats are the same float32 values
    # The lr schedule and the data really moved: steps differ from each other after the resume.
    assert len({r["learning_rate"] for r in got[HALF:]}) == TOTAL_STEPS - HALF
    assert len({r["logps/chosen"] for r in got}) == TOTAL_STEPS


if __name__ == "__main__":
    run(Path(sys.argv[1]), TOTAL_STEPS, checkpoint_every=HALF)
