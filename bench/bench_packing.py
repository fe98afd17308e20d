"""Packed DPO: padding saved on a realistic length distribution, and the train-step time it buys.

    python -m bench.bench_packing [--size cpu|gpu]

Lengths (tokens) are drawn per pair: prompt ~ lognormal(median 100, sigma 1.14), chosen and
rejected independently ~ lognormal(median 250, sigma 0.75), then truncated by bpo_jax's rule
(max_length 1024, max_prompt_length 512). The prompt spread is set so that 7.6% of prompts have
>= 512 tokens, the share TRL measured on trl-lib/ultrafeedback_binarized (huggingface/trl PR
#6421); the response medians are our assumption (no preference dataset is available offline).

Layouts compared on the same shuffled batches of 32 pairs:
- peer: TRL 1.16 DPOTrainer's collator, which pads every batch to its longest sequence (its
  `padding_free` option is disabled in 1.16); computed from the lengths, TRL is not run;
- ours, padded: bpo_jax's length buckets (multiples of 64), reported in the note;
- ours, packed: `pack_batch` (first-fit decreasing into rows of the batch's bucket length).
The timing row runs bpo_jax's jitted DPO train step on the padded and on the packed form of the
same batches (a small model; both sides compiled and warmed up first, then timed in alternating
blocks, median).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bench.common import bench_main, interleave, make_row, median
from bpo_jax.config import OptimSection, TrainSection
from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.data.packing import pack_batch, padding_fraction
from bpo_jax.data.tokenize import RaggedTokens, TokenizedPairs
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.sharding import make_mesh
from bpo_jax.train import DPOTrainer

TITLE = "Packed DPO (segment ids) vs padded batches"
COMMAND = "python -m bench.bench_packing"
PROMPT_MEDIAN, PROMPT_SIGMA = 100, 1.14
RESPONSE_MEDIAN, RESPONSE_SIGMA = 250, 0.75

CONFIGS = {
    # pairs for the padding statistics; the timed train steps: model, length scale, batches
    "cpu": dict(pairs=4096, batch=32, max_length=1024, time_batch=8, time_scale=0.25, time_batches=3,
                model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16), repeats=5),
    "gpu": dict(pairs=16384, batch=32, max_length=1024, time_batch=16, time_scale=1.0, time_batches=6,
                model=dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64), repeats=5),
}
SIZES = tuple(CONFIGS)  # no smollm2 variant: packing's gain is the padding share, not the model shape


def synthetic_pairs(n: int, max_length: int, scale: float = 1.0, seed: int = 0) -> TokenizedPairs:
    """Random token ids with the module docstring's length distribution, truncated as tokenize_pairs does."""
    rng = np.random.default_rng(seed)

    def lognormal(median, sigma):
        return np.maximum(1, np.round(scale * median * np.exp(sigma * rng.standard_normal(n)))).astype(np.int64)

    def ragged(lengths):
        flat = rng.integers(3, 500, size=int(lengths.sum()), dtype=np.int32)
        return RaggedTokens(flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)

    prompt = ragged(lognormal(PROMPT_MEDIAN, PROMPT_SIGMA))
    chosen = ragged(lognormal(RESPONSE_MEDIAN, RESPONSE_SIGMA))
    rejected = ragged(lognormal(RESPONSE_MEDIAN, RESPONSE_SIGMA))
    too_long = prompt.lengths + np.maximum(chosen.lengths, rejected.lengths) > max_length
    prompt = prompt.keep_last(np.where(too_long, max_length // 2, prompt.lengths))
    room = max_length - prompt.lengths
    chosen, rejected = chosen.keep_first(room), rejected.keep_first(room)
    ids = np.array([str(i) for i in range(n)])
    return TokenizedPairs(prompt, chosen, rejected, ids, np.arange(n), max_length, pad_id=0)


def padding_stats(data: TokenizedPairs, batch_size: int) -> dict[str, float]:
    """Padding share of the computed cells over one epoch, for the three layouts."""
    batcher = PreferenceBatcher(data, batch_size, seed=0, drop_last=True)
    real = cells_trl = cells_bucket = cells_packed = 0
    pack_seconds = []
    for batch in batcher.epoch_batches(0):
        lengths = np.concatenate([batch["chosen_attention_mask"].sum(1), batch["rejected_attention_mask"].sum(1)])
        real += int(lengths.sum())
        cells_trl += lengths.size * int(lengths.max())
        cells_bucket += 2 * batch["chosen_input_ids"].size
        start = time.perf_counter()
        packed = pack_batch(batch)
        pack_seconds.append(time.perf_counter() - start)
        cells_packed += packed["segment_ids"].size
        assert np.count_nonzero(packed["segment_ids"]) == int(lengths.sum())
        assert abs(padding_fraction(batch) - (1 - lengths.sum() / (2 * batch["chosen_input_ids"].size))) < 1e-12
    return {
        "trl": 1 - real / cells_trl,
        "bucketed": 1 - real / cells_bucket,
        "packed": 1 - real / cells_packed,
        "cells_trl": cells_trl,
        "cells_packed": cells_packed,
        "pack_ms": 1000 * median(pack_seconds),
        "batches": batcher.batches_per_epoch,
    }


def step_times(cfg: dict) -> dict[str, float]:
    """Median seconds to run `time_batches` DPO train steps, padded vs packed (same batches)."""
    data = synthetic_pairs(cfg["time_batch"] * cfg["time_batches"], int(cfg["max_length"] * cfg["time_scale"]),
                           scale=cfg["time_scale"], seed=1)
    data = data.with_ref_logps(np.full(len(data), -100.0), np.full(len(data), -100.0))
    batches = list(PreferenceBatcher(data, cfg["time_batch"], seed=0).epoch_batches(0))
    model_cfg = ModelConfig(**cfg["model"])
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    sides = {}
    for name, packing in (("padded", False), ("packed", True)):
        train = TrainSection(reference="precomputed", batch_size=cfg["time_batch"], packing=packing,
                             optim=OptimSection(learning_rate=1e-5, schedule="constant"))
        trainer = DPOTrainer(model=init_model(model_cfg, seed=0), config=train, mesh=mesh, total_steps=10**6)
        holder = {"state": trainer.init_state()}

        def block(trainer=trainer, holder=holder):
            start = time.perf_counter()
            for batch in batches:
                holder["state"], metrics = trainer.train_step(holder["state"], batch)
            jax.block_until_ready(metrics["loss"])
            return {"seconds": time.perf_counter() - start}

        block()  # compile every shape
        sides[name] = block
    results = interleave(sides, cfg["repeats"])
    padding = {name: padding_fraction(pack_batch(b) if name == "packed" else b) for name, b in
               (("padded", batches[0]), ("packed", batches[0]))}
    return {name: median([r["seconds"] for r in runs]) for name, runs in results.items()} | {
        "n_batches": len(batches), "first_batch_padding": padding}


def run(size: str = "cpu") -> list[dict]:
    cfg = CONFIGS[size]
    stats = padding_stats(synthetic_pairs(cfg["pairs"], cfg["max_length"]), cfg["batch"])
    command = f"{COMMAND} --size {size}"
    workload = (f"{cfg['pairs']:,} pairs, batches of {cfg['batch']}, max_length {cfg['max_length']}, "
                "UltraFeedback-like lengths")
    rows = [
        make_row(f"padding share of computed tokens: {workload}", stats["packed"], stats["trl"],
                 "fraction (lower is better)", command, lower_is_better=True,
                 note=(f"peer = TRL 1.16 pad-to-longest per batch; bpo_jax length buckets (padded) "
                       f"{stats['bucketed']:.3f}; packing one batch takes {stats['pack_ms']:.1f} ms on the host "
                       f"(median of {stats['batches']})")),
        make_row(f"token cells computed per epoch: {workload}", stats["cells_packed"], stats["cells_trl"],
                 "cells (lower is better)", command, lower_is_better=True,
                 note="every cell costs MLP FLOPs whether it holds a token or padding"),
    ]
    times = step_times(cfg)
    model = cfg["model"]
    rows.append(make_row(
        f"DPO train steps, padded vs packed ({model['num_hidden_layers']} layers x {model['hidden_size']}, "
        f"vocab {model['vocab_size']}, lengths x{cfg['time_scale']}, {times['n_batches']} batches of {cfg['time_batch']})",
        times["packed"], times["padded"], "s (lower is better)", command, lower_is_better=True,
        note=(f"peer = bpo_jax's own padded path on the same batches; padding share of the first batch "
              f"{times['first_batch_padding']['padded']:.2f} padded vs {times['first_batch_padding']['packed']:.2f} packed; "
              f"device {jax.devices()[0].platform}")))
    return rows


if __name__ == "__main__":
    bench_main(run, __doc__.splitlines()[0])
