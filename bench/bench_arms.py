"""Study arms as one program: stacked, vmapped arms (bpo_jax.arms) vs the same arms one after another.

    python -m bench.bench_arms [--size cpu|gpu]

The studies' model and batch (configs/studies/sort_base.yaml: a 2-layer Llama of hidden 64 over a
15-token vocabulary, 32 pairs of 32 tokens per step). "One after another" is the ordinary jitted
DPO step of one trainer, called for each arm in turn with that arm's state and batch (compiled
once, so no compile time is counted on either side); "stacked" is ArmsTrainer.train_step. The same
for held-out sampling: generate(..., arms=) vs generate per arm. Both sides are warmed up, then
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

TITLE = "Study arms: stacked (vmap over arms) vs one after another"
MODEL = ModelConfig(vocab_size=15, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2)
ARMS = {"cpu": 16, "gpu": 64}
STEPS_PER_BLOCK = 5


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
    arms = ArmsTrainer(trainer, [params] * num_arms, seeds)
    batchers = [PreferenceBatcher(random_pairs(256, s), 32, seed=s, buckets=(32,)) for s in seeds]
    stacked = {"state": arms.init_state()}
    alone = [TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params), trainer.tx.init(params), jax.random.PRNGKey(s))
             for s in seeds]

    def stacked_block() -> None:
        for _ in range(STEPS_PER_BLOCK):
            stacked["state"], _ = arms.train_step(stacked["state"], [next(b) for b in batchers])

    def alone_block() -> None:
        for _ in range(STEPS_PER_BLOCK):
            for a, b in enumerate(batchers):
                alone[a], metrics = trainer.train_step(alone[a], next(b))
                jax.block_until_ready(metrics)

    stacked_block(), alone_block()  # compile and warm up
    blocks = interleave({"stacked": lambda: {"seconds": timed(stacked_block)[0]},
                         "alone": lambda: {"seconds": timed(alone_block)[0]}}, 4)
    work = STEPS_PER_BLOCK * num_arms
    train_rate = {k: work / median([b["seconds"] for b in v]) for k, v in blocks.items()}

    prompts = [np.random.default_rng(i).integers(3, 15, size=10).tolist() for i in range(128)]
    sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=12, batch_size=128, seed=0)
    weights = arms.weights(stacked["state"])
    models = [arms.model_of(stacked["state"], a) for a in range(num_arms)]

    def sample_stacked() -> None:
        generate(models[0], prompts, sampling, arms=weights, progress=False)

    def sample_alone() -> None:
        for m in models:
            generate(m, prompts, sampling, progress=False)

    sample_stacked(), sample_alone()
    blocks = interleave({"stacked": lambda: {"seconds": timed(sample_stacked)[0]},
                         "alone": lambda: {"seconds": timed(sample_alone)[0]}}, 4)
    sample_rate = {k: num_arms * len(prompts) * 4 / median([b["seconds"] for b in v]) for k, v in blocks.items()}
    command = f"python -m bench.bench_arms --size {size}"
    shape = f"{num_arms} arms, the studies' model (2 layers, hidden 64, vocab 15)"
    return [
        make_row("DPO steps of study arms: stacked vs one after another", train_rate["stacked"], train_rate["alone"],
                 "arm-steps/s", command, note=f"{shape}, 32 pairs x 32 tokens per arm-step; {STEPS_PER_BLOCK} steps "
                 "per block, 4 alternating blocks, medians; compile excluded on both sides."),
        make_row("held-out sampling of study arms: stacked vs one after another", sample_rate["stacked"],
                 sample_rate["alone"], "responses/s", command,
                 note=f"{shape}, 128 prompts x 4 samples x 12 new tokens per arm; compile excluded."),
    ]


if __name__ == "__main__":
    bench_main(run, __doc__.splitlines()[0])
