"""Vocabulary-chunked log-probs: memory and time of a compiled DPO train step, chunking on vs off.

    python -m bench.bench_logps [--size cpu|smollm2|gpu]

One LoRA DPO train step (bpo_jax.train.DPOTrainer: sigmoid loss, reference log-probs
precomputed, float32, one device) compiled twice per vocabulary size: with train.vocab_chunk =
VOCAB_CHUNK (losses.chunked_sequence_logps: an online logsumexp over vocabulary chunks, each
chunk's logits recomputed in the backward pass) and with vocab_chunk = 0 (the [2B, T, V] logits
and their log-softmax gradient held whole). No other library takes part: the peer column is
bpo_jax with chunking off. Memory is XLA's analysis of the compiled step: arguments + outputs -
donated (aliased) bytes + temporaries, what the step needs resident at its peak. Step time: both
executables run from the same state on the same batch, timed in alternating blocks, median; their
first losses are checked equal.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bench.bench_dpo import collate, make_data
from bench.common import SMOLLM2, bench_main, interleave, make_row, median
from bpo_jax.config import LoraSection, OptimSection, TrainSection
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.sharding import make_mesh
from bpo_jax.train import DPOTrainer

TITLE = "Vocabulary-chunked log-probs: train-step memory"
VOCAB_CHUNK = 8192
LOSS_RTOL = 1e-4  # chunked vs whole-vocabulary loss of the first step
SETTINGS = {
    "cpu": dict(vocabs=(32768, 131072), lora_rank=8, batch_size=4, prompt_len=64, response_len=192, repeats=3,
                model=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32)),
    "gpu": dict(vocabs=(32768, 131072), lora_rank=16, batch_size=8, prompt_len=256, response_len=768, repeats=5,
                model=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=64)),
    # SmolLM2-135M's shape and vocabulary, the DPO bench's batch.
    "smollm2": dict(vocabs=(SMOLLM2["vocab_size"],), lora_rank=16, batch_size=2, prompt_len=64, response_len=192,
                    repeats=3, model={k: v for k, v in SMOLLM2.items() if k != "vocab_size"}),
}


def resident_bytes(stats) -> int:
    """Bytes a compiled executable needs at its peak, from its memory analysis."""
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


class CompiledStep:
    """The trainer's jitted step compiled for one batch shape; each call is one timed step."""

    def __init__(self, s: dict, vocab: int, vocab_chunk: int, batch: dict[str, np.ndarray]):
        model = init_model(ModelConfig(vocab_size=vocab, **s["model"]), seed=0)
        add_lora(model, LoraSection(rank=s["lora_rank"]), seed=0)
        train = TrainSection(beta=0.1, batch_size=s["batch_size"], reference="precomputed", vocab_chunk=vocab_chunk,
                             optim=OptimSection(learning_rate=1e-4))
        self.trainer = DPOTrainer(model, train, make_mesh((1, 1, 1), devices=jax.devices()[:1]), total_steps=10**6)
        self.state = self.trainer.init_state()
        self.batch = batch
        stats = self.trainer.lower_step(self.state, batch).compile().memory_analysis()
        self.memory_mib, self.temp_mib = resident_bytes(stats) / 2**20, stats.temp_size_in_bytes / 2**20
        self.first_loss = self()["loss"]

    def __call__(self) -> dict:
        start = time.perf_counter()
        self.state, metrics = self.trainer.train_step(self.state, self.batch)
        loss = float(metrics["loss"])  # waits for the step
        return {"seconds": time.perf_counter() - start, "loss": loss}


def compare_vocab(s: dict, vocab: int, command: str) -> list[dict]:
    """Memory and step-time rows at one vocabulary size."""
    data = make_data(s["batch_size"], s["prompt_len"], s["response_len"], vocab)
    batch = collate(data, np.arange(s["batch_size"]))
    rng = np.random.default_rng(0)
    uniform = -s["response_len"] * np.log(vocab)  # a random model's log-prob: the loss is not saturated
    for side in ("chosen", "rejected"):
        batch[f"ref_{side}_logps"] = rng.normal(uniform, 5, s["batch_size"]).astype(np.float32)
    steps = {"chunked": CompiledStep(s, vocab, VOCAB_CHUNK, batch), "whole": CompiledStep(s, vocab, 0, batch)}
    loss = {name: step.first_loss for name, step in steps.items()}
    if not np.isclose(loss["chunked"], loss["whole"], rtol=LOSS_RTOL, atol=0):
        raise AssertionError(f"vocab {vocab}: chunked first loss {loss['chunked']} != whole-vocabulary {loss['whole']}")
    memory = {name: step.memory_mib for name, step in steps.items()}
    temp = {name: step.temp_mib for name, step in steps.items()}
    timed = interleave(steps, s["repeats"])
    seconds = {name: median([b["seconds"] for b in blocks]) for name, blocks in timed.items()}
    tokens = s["prompt_len"] + s["response_len"]
    logits_mib = 2 * s["batch_size"] * tokens * vocab * 4 / 2**20
    m = s["model"]
    shape = (f"vocab {vocab}, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, LoRA r{s['lora_rank']}, "
             f"batch {s['batch_size']} pairs x {tokens} tokens, float32 (one [2B, T, V] logits array: "
             f"{logits_mib:,.0f} MiB)")
    return [
        make_row(f"DPO train step, vocab {vocab}: memory, vocab_chunk {VOCAB_CHUNK} vs off", memory["chunked"],
                 memory["whole"], "MiB (lower is better)", command, lower_is_better=True,
                 note=f"{shape}; XLA memory analysis of the compiled step (arguments + outputs - donated + "
                      f"temporaries), temporaries alone {temp['chunked']:,.0f} vs {temp['whole']:,.0f} MiB; "
                      f"first-step losses equal (rtol {LOSS_RTOL:g})."),
        make_row(f"DPO train step, vocab {vocab}: time, vocab_chunk {VOCAB_CHUNK} vs off", seconds["chunked"],
                 seconds["whole"], "s/step (lower is better)", command, lower_is_better=True,
                 note=f"{shape}; {jax.devices()[0].device_kind}; {s['repeats']} interleaved steps, median."),
    ]


def run(size: str) -> list[dict]:
    s = SETTINGS[size]
    command = f"python -m bench.bench_logps --size {size}"
    return [row for vocab in s["vocabs"] for row in compare_vocab(s, vocab, command)]


if __name__ == "__main__":
    bench_main(run, __doc__.splitlines()[0])
