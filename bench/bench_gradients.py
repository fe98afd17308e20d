"""BPO gradient features: vmap(grad) micro-batches vs a per-pair loop, and their cost vs one DPO epoch.

    python -m bench.bench_gradients [--size cpu|smollm2|gpu]

Rows, all measured in alternating repetitions (ABBA order, median of each):
  0. features (the GradientFeaturizer) vs LESS's recipe in PyTorch + PEFT (bench/peer_less.py,
     in its own process, one per allocator setting of bench.common.peer_variants, the best one
     taken): a forward and backward pass per pair, the LoRA gradients flattened, projected 16 at a
     time by a dense random matrix to the same proj_dim, L2-normalized. Same base weights
     (exported with save_hf_model), adapter values, pairs and reference log-probs; the peer's
     gradient of pair 0 before projection is checked against jax.grad of
     bpo_jax.gradients.pair_loss. Not run where the dense matrix would exceed
     PEER_PROJECTION_LIMIT bytes.
  0b. per-pair gradients of every pair without projection: vmap(grad) over micro-batches vs the
     same peer pass with its projection time taken out.
Rows 1-3 run in this process:
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

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import SMOLLM2, Worker, bench_main, interleave, make_row, median, peer_python, peer_variants
from bench.flops import dpo_step_flops
from bpo_jax.config import LoraSection, OptimSection, TrainSection
from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
from bpo_jax.gradients import (
    REFERENCE_FIELDS,
    SEQUENCE_FIELDS,
    FeatureSettings,
    GradientFeaturizer,
    l2_normalize,
    pair_loss,
    path_string,
    project,
)
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.hf import hf_tensor_name, save_hf_model
from bpo_jax.models.llama import init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.sharding import make_mesh
from bpo_jax.train import DPOTrainer

TITLE = "BPO gradient features: vmap vs per-pair loop, and cost vs a DPO epoch"
TARGET = 5.0  # vmap features at least 5x the per-pair loop's pairs/s
LESS_PROJECT_EVERY = 16  # gradients per projection in LESS's collect_grads
LESS_PROJ_DIM = 8192  # LESS's projection dimension
PEER_THREADS = 2
# Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread that loses its core
# stalls every barrier. Measured on 2 cores: with another job running, the default policy made blocks
# 15-30x slower; on an idle machine PASSIVE costs the peer about 10%.
PEER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
PEER_PROJECTION_LIMIT = 4 << 30  # bytes of the peer's dense [params, proj_dim] float32 matrix
PEER_GRAD_RTOL = 1e-4  # |g_torch - g_jax| / |g_jax| of pair 0 (a size's grad_rtol overrides it)
PEFT_WEIGHTS = {"lora_a": "lora_A", "lora_b": "lora_B"}  # our adapter leaf -> PEFT's submodule
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
    # SmolLM2-135M's shape: 2,442,240 LoRA r8 parameters. proj_dim 256 keeps the peer's dense
    # [params, proj_dim] float32 matrix at 2.3 GiB (8192 would be 75 GiB; see PEER_PROJECTION_LIMIT).
    "smollm2": dict(
        model=SMOLLM2, lora_rank=8, pairs=32, prompt_len=64, response_len=128, micro_batch=4, loop_pairs=4,
        proj_dim=256, train_batch=4, repeats=3,  # batches of 4 pairs: ~1,500 tokens, about the DPO bench's step
        # float32 through 30 layers and a 49k vocabulary: 2e-5 measured with 2 of the layers; a wrong
        # layout or loss would be off by O(1).
        grad_rtol=1e-3,
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


def base_model(s: dict):
    """The benchmark's model without adapters (init_model is seeded: every call, the same weights)."""
    return init_model(ModelConfig(**s["model"]), seed=0)


def build_model(s: dict):
    """The benchmark's LoRA model, its B moved off zero (as after a warm-up: A has gradients too)."""
    model = base_model(s)
    add_lora(model, LoraSection(rank=s["lora_rank"]), seed=0)
    for i, (_, m) in enumerate(nnx.iter_modules(model)):
        if getattr(m, "lora_b", None) is not None:
            m.lora_b.set_value(0.01 * jax.random.normal(jax.random.key(i), m.lora_b.shape))
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
        for block in (self.features, self.loop_features, self.vmap_grads, self.all_grads, self.loop_grads, self.dpo_epoch):
            block()  # compile and warm up
        self.check_loop_equals_vmap()

    def _compile_loops(self, model) -> None:
        settings = self.settings
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

    def all_grads(self) -> dict:
        """Per-pair gradients of every pair, no projection: vmap(grad) over micro-batches."""
        start, pairs, mb = time.perf_counter(), 0, self.s["micro_batch"]
        for batch in self.feature_batches:
            for i in range(0, len(batch["valid"]), mb):
                jax.block_until_ready(self.batch_grads(self.trainable, self.frozen, {k: v[i:i + mb] for k, v in batch.items()}))
            pairs += int(np.sum(np.asarray(batch["valid"]) > 0))
        return {"seconds": time.perf_counter() - start, "pairs": pairs}

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

    def pair_gradient(self, pair: int) -> np.ndarray:
        """jax.grad of pair_loss for row `pair` of the first feature batch, flattened in leaf order."""
        example = {k: v[pair] for k, v in self.feature_batches[0].items()}
        grads = self.one_grad(self.trainable, self.frozen, example)
        return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    def check_loop_equals_vmap(self) -> None:
        looped = np.stack([np.asarray(f) for f in self.loop_features()["features"]])
        batched = self.features()["features"][0][: len(looped)]
        if not np.allclose(looped, batched, atol=1e-4):
            raise AssertionError(f"per-pair loop features differ from the featurizer's by {np.abs(looped - batched).max()}")


# -- the PyTorch (LESS-style) peer -------------------------------------------------------------------
def save_peft_adapters(trainable: nnx.State, path: Path) -> None:
    """The adapters in PEFT's layout, in leaf order: '<HF module>.lora_A' = A.T, '.lora_B' = B.T."""
    arrays = {}
    for keys, value in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        *module, leaf = path_string(keys).split("/")
        name = hf_tensor_name(tuple(module) + ("kernel",))[0].removesuffix(".weight")
        arrays[f"{name}.{PEFT_WEIGHTS[leaf]}"] = np.asarray(value).T
    np.savez(path, **arrays)


def save_pairs(batches: list[dict], path: Path) -> None:
    """The valid rows of the feature batches, in order: the pairs the peer featurizes."""
    keep = np.concatenate([np.asarray(b["valid"]) > 0 for b in batches])
    np.savez(path, **{f: np.concatenate([np.asarray(b[f]) for b in batches])[keep]
                      for f in SEQUENCE_FIELDS + REFERENCE_FIELDS})


def start_less_peers(bench: Bench, directory: Path, stack: ExitStack) -> tuple[dict[str, Worker], dict]:
    """One peer worker per allocator setting (bench.common.peer_variants), set up on the benchmark's
    model and pairs; the first one's pair-0 gradient is checked against jax.grad.

    Returns the workers by name and the first one's setup info plus `grad_rel_diff`,
    |g_torch - g_jax| / |g_jax|.
    """
    s = bench.s
    save_hf_model(base_model(s), directory / "model")
    save_peft_adapters(bench.trainable, directory / "adapters.npz")
    save_pairs(bench.feature_batches, directory / "pairs.npz")
    lora = LoraSection(rank=s["lora_rank"])
    peers, info = {}, None
    for variant, env in peer_variants().items():
        name = f"less_loop ({variant})"
        peers[name] = stack.enter_context(Worker(name, peer_python(), "bench.peer_less", {**PEER_ENV, **env}))
        setup = peers[name].call(
            "setup", model_dir=str(directory / "model"), adapters_path=str(directory / "adapters.npz"),
            pairs_path=str(directory / "pairs.npz"), rank=lora.rank, alpha=lora.alpha, targets=list(lora.targets),
            beta=bench.settings.beta, proj_dim=s["proj_dim"], project_every=LESS_PROJECT_EVERY,
            threads=PEER_THREADS, seed=bench.settings.seed)
        info = info or setup
    ours = bench.pair_gradient(0)
    theirs = np.asarray(next(iter(peers.values())).call("gradient", pair=0)["gradient"], np.float32)
    rel, rtol = float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours)), s.get("grad_rtol", PEER_GRAD_RTOL)
    if not rel < rtol:
        raise AssertionError(f"PyTorch pair-0 gradient differs from jax.grad(pair_loss) by {rel:.2e} (relative)")
    return peers, {**info, "grad_rel_diff": rel, "grad_rtol": rtol}


def rate(blocks: list[dict], seconds: str = "seconds") -> float:
    return median([b["pairs"] / b[seconds] for b in blocks])


def run(size: str) -> list[dict]:
    s = SETTINGS[size]
    bench = Bench(s)
    sides = {name: getattr(bench, name)
             for name in ("features", "loop_features", "vmap_grads", "all_grads", "loop_grads", "dpo_epoch")}
    dense_bytes = 4 * bench.featurizer.num_params * s["proj_dim"]
    with tempfile.TemporaryDirectory(prefix="bench-gradients-") as tmp, ExitStack() as stack:
        peers = {}
        if dense_bytes <= PEER_PROJECTION_LIMIT:
            peers, peer_info = start_less_peers(bench, Path(tmp), stack)
            sides = {"features": sides.pop("features"),
                     **{name: (lambda w=w: w.call("measure")) for name, w in peers.items()}, **sides}
        timed = interleave(sides, s["repeats"])
    command = f"python -m bench.bench_gradients --size {size}"
    f = bench.featurizer
    shape = (f"{f.num_params:,} LoRA params (rank {s['lora_rank']}) of a {s['model']['num_hidden_layers']}-layer, "
             f"{s['model']['hidden_size']}-wide model (vocab {s['model']['vocab_size']}); {s['pairs']} pairs of "
             f"{s['prompt_len']}+{s['response_len']} tokens; proj_dim {s['proj_dim']}, chunk {f.settings.chunk_size}, "
             f"micro-batch {s['micro_batch']}; {jax.devices()[0].device_kind}; {s['repeats']} interleaved repetitions, median")
    seq = s["prompt_len"] + s["response_len"]
    pair_flops = dpo_step_flops(ModelConfig(**s["model"]), 2 * seq, seq, lora_params=f.num_params, reference_forward=False)
    feature_s = median([b["seconds"] for b in timed["features"]])
    flop_rate = (f"featurizer at {pair_flops * rate(timed['features']) / 1e9:.0f} GFLOP/s of model FLOPs "
                 f"({pair_flops / 1e9:.3g} GFLOP per pair: LoRA forward and backward of chosen and rejected, bench/flops.py)")
    epoch_s = median([b["seconds"] for b in timed["dpo_epoch"]])
    if not peers:
        less_rate = less_grad_rate = float("nan")
        less_note = f"not run: the peer's dense projection would take {dense_bytes / 2**30:.0f} GiB; {shape}."
        grad_note = less_note
    else:
        with_projection = {name: rate(timed[name]) for name in peers}
        gradients_only = {name: rate(timed[name], "gradient_seconds") for name in peers}
        less_rate, less_grad_rate = max(with_projection.values()), max(gradients_only.values())
        less_note = (
            f"{shape}; peer: torch {peer_info['torch']} + peft {peer_info['peft']} on CPU, "
            f"{peer_info['torch_threads']} threads, OMP_WAIT_POLICY=PASSIVE, {peer_info['trainable_params']:,} LoRA "
            f"params; one forward+backward per pair, gradients projected {LESS_PROJECT_EVERY} at a time to the same "
            f"proj_dim {s['proj_dim']} by a dense Rademacher matrix made at setup ({dense_bytes / 2**30:.1f} GiB"
            + ("" if s["proj_dim"] == LESS_PROJ_DIM else
               f"; LESS's {LESS_PROJ_DIM} would need {4 * f.num_params * LESS_PROJ_DIM / 2**30:.0f} GiB dense")
            + f"), all {s['pairs']} pairs per block; pair-0 gradient before projection matches jax.grad(pair_loss) to "
            f"{peer_info['grad_rel_diff']:.1e} relative (asserted < {peer_info['grad_rtol']:g}); peer at its best allocator "
            "setting: " + "; ".join(f"{name}: {v:.3g} pairs/s" for name, v in with_projection.items())
            + f"; {flop_rate}; {TARGET:g}x the peer would take {TARGET * less_rate * pair_flops / 1e9:.0f} GFLOP/s.")
        grad_note = (f"{shape}; bpo_jax: jax.vmap(jax.grad(pair_loss)) over micro-batches of every pair, gradients "
                     "left unprojected; peer: the same LESS-style pass, its projection time excluded (timed apart in "
                     "the same pass); peer settings: "
                     + "; ".join(f"{name}: {v:.3g} pairs/s" for name, v in gradients_only.items()) + ".")
    return [
        make_row("gradient features: featurizer vs PyTorch per-pair loop (LESS-style), equal proj_dim",
                 rate(timed["features"]), less_rate, "pairs/s", command, note=less_note, target=TARGET),
        make_row("per-pair gradients, no projection: vmap(grad) vs PyTorch per-pair loop", rate(timed["all_grads"]),
                 less_grad_rate, "pairs/s", command, note=grad_note),
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
