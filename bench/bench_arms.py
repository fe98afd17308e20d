"""Study arms as one program (bpo_jax.arms): stacked arms, vmapped or looped inside the program, vs
the same arms one after another.

    python -m bench.bench_arms [--size cpu|gpu]

The studies' model and batch (configs/studies/sort_base.yaml: a 2-layer Llama of hidden 64 over a
15-token vocabulary, 32 pairs of 32 tokens per step). "One after another" is the ordinary jitted
DPO step of one trainer, called for each arm in turn with that arm's state and batch (compiled
once, so no compile time is counted on either side); "stacked" is ArmsTrainer.train_step in each
mode of bpo_jax.stacking (vmap: batched ops; map: a loop over arms inside the program). The same
for held-out sampling: generate(..., arms=) vs generate per arm. All sides are warmed up, then
timed in alternating blocks; medians are reported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import bench_main, interleave, make_row, median, timed
from bpo_jax.arms import ArmsTrainer
from bpo_jax.config import OptimSection, TrainSection
from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.sampling import SamplingConfig, default_mesh, generate
from bpo_jax.train import DPOTrainer, TrainState

TITLE = "Study arms: stacked (vmap / loop over arms in one program) vs one after another"
MODEL = ModelConfig(vocab_size=15, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, eos_token_id=2)
ARMS = {"cpu": 16, "gpu": 64}
SIZES = tuple(ARMS)  # the studies' tiny model: no smollm2 variant
STEPS_PER_BLOCK = 5
MODES = ("vmap", "map")


def random_pairs(n: int, seed: int) -> TokenizedPairs:
    rng = np.random.default_rng(seed)

    def seqs(lo, hi):
        return [rng.integers(3, 15, size=rng.integers(lo, hi)).tolist() for _ in range(n)]

    data = TokenizedPairs(prompt=RaggedTokens.from_lists(seqs(8, 14)), chosen=RaggedTokens.from_lists(seqs(5, 11), append=2),
                          rejected=RaggedTokens.from_lists(seqs(5, 11), append=2), ids=np.arange(n).astype(str),
                          source_index=np.arange(n), max_length=32, pad_id=0)
    return data.with_ref_logps(rng.normal(-20, 2, n).astype(np.float32), rng.normal(-22, 2, n).astype(np.float32))


def run(size: str) -> list[dict]:
    num_arms = ARMS[size]
    cfg = TrainSection(beta=1.0, batch_size=32, reference="precomputed", optim=OptimSection(learning_rate=1e-4), seed=0)
    model = init_model(MODEL, seed=0)
    trainer = DPOTrainer(model, cfg, default_mesh(), total_steps=1000)
    params = nnx.split(model, nnx.Param, ...)[1]
    seeds = list(range(num_arms))
    batchers = [PreferenceBatcher(random_pairs(256, s), 32, seed=s, buckets=(32,)) for s in seeds]
    stacked = {mode: ArmsTrainer(trainer, [params] * num_arms, seeds, mode=mode) for mode in MODES}
    states = {mode: arms.init_state() for mode, arms in stacked.items()}
    alone = [TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), trainer.tx.init(params), jax.random.PRNGKey(s))
             for s in seeds]

    def stacked_block(mode: str) -> None:
        for _ in range(STEPS_PER_BLOCK):
            states[mode], _ = stacked[mode].train_step(states[mode], [next(b) for b in batchers])

    def alone_block() -> None:
        for _ in range(STEPS_PER_BLOCK):
            for a, b in enumerate(batchers):
                alone[a], metrics = trainer.train_step(alone[a], next(b))
                jax.block_until_ready(metrics)

    sides = {**{mode: (lambda m=mode: stacked_block(m)) for mode in MODES}, "alone": alone_block}
    train_rate = rates(sides, STEPS_PER_BLOCK * num_arms)

    prompts = [np.random.default_rng(i).integers(3, 15, size=10).tolist() for i in range(128)]
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=12, batch_size=128, seed=0)
    models = [stacked["map"].model_of(states["map"], a) for a in range(num_arms)]
    sides = {**{mode: (lambda m=mode: generate(models[0], prompts, sampling, arms=stacked[m].weights(states["map"]), progress=False))
                for mode in MODES},
             "alone": lambda: [generate(m, prompts, sampling, progress=False) for m in models]}
    sample_rate = rates(sides, num_arms * len(prompts) * 4)
    command = f"python -m bench.bench_arms --size {size}"
    shape = f"{num_arms} arms, the studies' model (2 layers, hidden 64, vocab 15)"
    rows = []
    for mode in MODES:
        rows.append(make_row(f"DPO steps of study arms: stacked ({mode}) vs one after another", train_rate[mode],
                             train_rate["alone"], "arm-steps/s", command,
                             note=f"{shape}, 32 pairs x 32 tokens per arm-step; {STEPS_PER_BLOCK} steps per block, "
                                  "4 alternating blocks, medians; compile excluded on every side."))
    for mode in MODES:
        rows.append(make_row(f"held-out sampling of study arms: stacked ({mode}) vs one after another", sample_rate[mode],
                             sample_rate["alone"], "responses/s", command,
                             note=f"{shape}, 128 prompts x 4 samples x 12 new tokens per arm; compile excluded."))
    return rows


def rates(sides: dict, work: int) -> dict[str, float]:
    """Warm every side up once, time them in alternating blocks; work units per second (median)."""
    for fn in sides.values():
        fn()
    blocks = interleave({name: (lambda f=fn: {"seconds": timed(f)[0]}) for name, fn in sides.items()}, 4)
    return {name: work / median([b["seconds"] for b in v]) for name, v in blocks.items()}


if __name__ == "__main__":
    bench_main(run, __doc__.splitlines()[0])
