"""BPO gradient features: vmap(grad) micro-batches vs a per-pair loop, and their cost vs one DPO epoch.

    python -m bench.bench_gradients [--size cpu|gpu]

Three rows, all measured in one process in alternating repetitions (ABBA order, median of each):
  1. features (the pipeline's GradientFeaturizer: vmap(grad) micro-batches, all rows projected
     together) vs the same features one pair at a time (a jitted grad + chunked projection per
     pair: what a per-example loop does); the loop runs on the first `loop_pairs` pairs, its
     features are checked equal to the featurizer's, and its per-pair rate is used.
  2. per-pair gradients only (no projection): jax.vmap(jax.grad) over a micro-batch vs a loop of
     jitted jax.grad, one pair per call.
  3. feature extraction over all pairs vs one DPO epoch over the same pairs (LoRA, reference
     log-probs precomputed, the trainer's jitted step): ratio = epoch time / feature time, so
     features cost 1/ratio epochs.
Compilation is excluded (every function runs once before timing).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import bench_main, interleave, make_row, median
from bpo_jax.config import LoraSection, OptimSection, TrainSection
from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
from bpo_jax.gradients import FeatureSettings, GradientFeaturizer, pair_loss, l2_normalize, project
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.sharding import make_mesh
from bpo_jax.train import DPOTrainer

TITLE = "BPO gradient features: vmap vs per-pair loop, and cost vs a DPO epoch"
TARGET = 5.0  # vmap features at least 5x the per-pair loop's pairs/s
SETTINGS = {
    "cpu": dict(
        model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        lora_rank=8, pairs=128, prompt_len=16, response_len=48, micro_batch=16, loop_pairs=8,
        proj_dim=8192, train_batch=16, repeats=3,
    ),
    "gpu": dict(
        model=dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=64),
        lora_rank=16, pairs=1024, prompt_len=128, response_len=384, micro_batch=16, loop_pairs=64,
        proj_dim=8192, train_batch=32, repeats=5,
    ),
}


def make_data(n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> TokenizedPairs:
    """Random token pairs of full length (no padding waste on either side) with reference log-probs."""
    rng = np.random.default_rng(seed)

    def seqs(length: int) -> RaggedTokens:
        return RaggedTokens.from_lists(rng.integers(3, vocab, (n, length)).tolist())

    data = TokenizedPairs(seqs(prompt_len), seqs(response_len), seqs(response_len), np.arange(n).astype(str),
                          np.arange(n), prompt_len + response_len, pad_id=0)
    return data.with_ref_logps(rng.normal(-300, 5, n), rng.normal(-300, 5, n))


def build_model(s: dict):
    """The benchmark's LoRA model, its B moved off zero (as after a warm-up: A has gradients too)."""
    model = init_model(ModelConfig(**s["model"]), seed=0)
    add_lora(model, LoraSection(rank=s["lora_rank"]), seed=0)
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if getattr(m, "lora_b", None) is not None:
            m.lora_b.value = 0.01 * jax.random.normal(jax.random.key(i), m.lora_b.shape)
    return model


class Bench:
    """Everything set up and compiled once; each method times one block."""

    def __init__(self, s: dict):
        self.s = s
        model = build_model(s)
        self.data = make_data(s["pairs"], s["prompt_len"], s["response_len"], s["model"]["vocab_size"])
        length = (s["prompt_len"] + s["response_len"],)
        self.settings = FeatureSettings(proj_dim=s["proj_dim"])
        self.featurizer = GradientFeaturizer(model, self.settings, micro_batch=s["micro_batch"])
        rows = self.featurizer.rows_per_call(len(self.data))
        self.feature_batches = list(PreferenceBatcher(self.data, rows, shuffle=False, buckets=length).epoch_batches())
        self.loop_rows = [
            {k: v[i] for k, v in self.feature_batches[0].items()} for i in range(s["loop_pairs"])
        ]
        self.micro = {k: v[: s["micro_batch"]] for k, v in self.feature_batches[0].items()}
        self._compile_loops(model)
        mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
        train = TrainSection(beta=0.1, batch_size=s["train_batch"], optim=OptimSection(learning_rate=1e-4))
        self.train_batches = list(PreferenceBatcher(self.data, s["train_batch"], shuffle=False, buckets=length).epoch_batches())
        self.trainer = DPOTrainer(build_model(s), train, mesh, total_steps=10**6)  # its own copy: the step donates it
        self.state = self.trainer.init_state()
        for block in (self.features, self.loop_features, self.vmap_grads, self.loop_grads, self.dpo_epoch):
            block()  # compile and warm up
        self.check_loop_equals_vmap()

    def _compile_loops(self, model) -> None:
        s, settings = self.s, self.settings
        graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
        self.trainable, self.frozen = trainable, frozen
        loss = lambda t, f, ex: pair_loss(t, f, ex, graphdef=graphdef, loss_type="sigmoid", beta=settings.beta,
                                           label_smoothing=0.0, gamma=0.0, vocab_chunk=0)
        sizes = self.featurizer.leaf_sizes

        def flat(tree):
            return jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree.leaves(tree)], axis=1)

        @jax.jit
        def one_feature(t, f, ex):
            g = jax.tree.map(lambda x: x[None], jax.grad(loss)(t, f, ex))
            return l2_normalize(project(flat(g), sizes, proj_dim=settings.proj_dim, seed=settings.seed,
                                        chunk_size=settings.chunk_size, projection=settings.projection))[0]

        self.one_feature = one_feature
        self.one_grad = jax.jit(jax.grad(loss))
        self.batch_grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, None, 0)))

    # -- timed blocks --------------------------------------------------------------------------------
    def features(self) -> dict:
        start = time.perf_counter()
        out = [self.featurizer(b) for b in self.feature_batches]
        return {"seconds": time.perf_counter() - start, "pairs": len(self.data), "features": out}

    def loop_features(self) -> dict:
        start = time.perf_counter()
        out = [self.one_feature(self.trainable, self.frozen, ex) for ex in self.loop_rows]
        jax.block_until_ready(out)
        return {"seconds": time.perf_counter() - start, "pairs": len(out), "features": out}

    def vmap_grads(self) -> dict:
        start = time.perf_counter()
        jax.block_until_ready(self.batch_grads(self.trainable, self.frozen, self.micro))
        return {"seconds": time.perf_counter() - start, "pairs": self.s["micro_batch"]}

    def loop_grads(self) -> dict:
        start = time.perf_counter()
        rows = [{k: v[i] for k, v in self.micro.items()} for i in range(self.s["micro_batch"])]
        jax.block_until_ready([self.one_grad(self.trainable, self.frozen, ex) for ex in rows])
        return {"seconds": time.perf_counter() - start, "pairs": self.s["micro_batch"]}

    def dpo_epoch(self) -> dict:
        start = time.perf_counter()
        for batch in self.train_batches:
            self.state, metrics = self.trainer.train_step(self.state, batch)
        jax.block_until_ready(metrics)
        return {"seconds": time.perf_counter() - start, "pairs": len(self.data)}

    def check_loop_equals_vmap(self) -> None:
        looped = np.stack([np.asarray(f) for f in self.loop_features()["features"]])
        batched = self.features()["features"][0][: len(looped)]
        if not np.allclose(looped, batched, atol=1e-4):
            raise AssertionError(f"per-pair loop features differ from the featurizer's by {np.abs(looped - batched).max()}")


def rate(blocks: list[dict]) -> float:
    return median([b["pairs"] / b["seconds"] for b in blocks])


def run(size: str) -> list[dict]:
    s = SETTINGS[size]
    bench = Bench(s)
    timed = interleave({name: getattr(bench, name) for name in
                        ("features", "loop_features", "vmap_grads", "loop_grads", "dpo_epoch")}, s["repeats"])
    command = f"python -m bench.bench_gradients --size {size}"
    f = bench.featurizer
    shape = (f"{f.num_params:,} LoRA params (rank {s['lora_rank']}) of a {s['model']['num_hidden_layers']}-layer, "
             f"{s['model']['hidden_size']}-wide model (vocab {s['model']['vocab_size']}); {s['pairs']} pairs of "
             f"{s['prompt_len']}+{s['response_len']} tokens; proj_dim {s['proj_dim']}, chunk {f.settings.chunk_size}, "
             f"micro-batch {s['micro_batch']}; {jax.devices()[0].device_kind}; {s['repeats']} interleaved repetitions, median")
    feature_s = median([b["seconds"] for b in timed["features"]])
    epoch_s = median([b["seconds"] for b in timed["dpo_epoch"]])
    return [
        make_row("gradient features: featurizer vs per-pair loop", rate(timed["features"]), rate(timed["loop_features"]),
                 "pairs/s", command, target=TARGET,
                 note=f"{shape}; loop over the first {s['loop_pairs']} pairs (features checked equal, atol 1e-4)."),
        make_row("per-pair gradients only: vmap(grad) vs jax.grad loop", rate(timed["vmap_grads"]),
                 rate(timed["loop_grads"]), "pairs/s", command, note=f"one micro-batch of {s['micro_batch']} pairs; {shape}."),
        make_row("feature extraction vs one DPO epoch (same pairs)", feature_s, epoch_s, "s", command,
                 lower_is_better=True,
                 note=f"features take {feature_s / epoch_s:.2f} epochs of DPO training (batch {s['train_batch']}, "
                      f"LoRA, reference log-probs precomputed); {shape}."),
    ]


if __name__ == "__main__":
    bench_main(run, __doc__.splitlines()[0])
