"""DPO training throughput: bpo_jax's train step vs TRL's DPOTrainer, full fine-tuning and LoRA.

    python -m bench.bench_dpo [--size cpu|smollm2|gpu]

Equal settings on both sides: one Llama-family config, float32, the same initial weights (bpo_jax
builds the model and exports it with `save_hf_model`; TRL loads that directory), the same token
ids (prompt + chosen/rejected of fixed lengths, so no padding and the same token count per step),
the same batch size, sigmoid DPO with beta 0.1, AdamW at a constant learning rate, gradient
clipping at 1.0, no activation checkpointing, a reference forward every step (full fine-tuning:
a frozen copy of the initial weights, bpo_jax `frozen_copy` vs TRL's reference model; LoRA:
the model with adapters off, bpo_jax `lora_off` vs TRL/PEFT's disabled adapters). Tokens/s
counts every token of chosen and rejected sequences. bpo_jax runs with the malloc settings its
command line uses (bpo_jax.host_memory); TRL runs under glibc malloc, jemalloc when found, and
glibc with bpo_jax's settings; the ratio is taken against its fastest setting. Peak memory is the
process's peak RSS over the timed steps (framework runtime included). Per mode, two more rows:
time to the first step (compilation on our side), and model-FLOP utilization (bench/flops.py,
reference forward included) against a square matmul's rate (bench_mfu's peak), timed in bpo_jax's
worker in the same alternation.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from bench.common import (
    SMOLLM2,
    against_peer_variants,
    bench_main,
    make_row,
    median,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
)
from bench.flops import dpo_step_flops, matmul_params

TITLE = "DPO training step vs TRL DPOTrainer"
TARGET = 1.5
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
LORA = {"rank": 16, "alpha": 32.0,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
OPTIM = {"learning_rate": 5e-6, "beta": 0.1, "max_grad_norm": 1.0}

SETTINGS = {
    # ~19M parameters, Llama-2 vocabulary: the LM head dominates, as in small real models.
    "cpu": {"model": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                      "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32},
            "batch_size": 4, "prompt_len": 64, "response_len": 64, "steps": 1, "repeats": 5, "warmup": 2},
    "gpu": {"model": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                      "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64},
            "batch_size": 16, "prompt_len": 256, "response_len": 256, "steps": 5, "repeats": 5, "warmup": 3},
    # SmolLM2-135M's shape on CPU: seconds per step, so one step per block and one warm-up step.
    "smollm2": {"model": SMOLLM2, "batch_size": 2, "prompt_len": 64, "response_len": 192, "steps": 1, "repeats": 5,
                "warmup": 1},
}


def model_config(spec: dict, **run_options):
    """The benchmark's Llama config (bpo_jax.models.config.ModelConfig)."""
    from bpo_jax.models.config import ModelConfig

    return ModelConfig(**{"rope_theta": 10000.0, **spec}, max_position_embeddings=4096, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID, pad_token_id=PAD_ID, **run_options)


def make_data(n: int, prompt_len: int, response_len: int, vocab_size: int, seed: int = 0) -> dict:
    """n preference examples of random token ids; responses end with EOS (as TRL appends it)."""
    rng = np.random.default_rng(seed)

    def draw(length: int, eos: bool) -> list[list[int]]:
        ids = rng.integers(3, vocab_size, size=(n, length))
        if eos:
            ids[:, -1] = EOS_ID
        return ids.tolist()

    return {"prompt_ids": draw(prompt_len, False), "chosen_ids": draw(response_len, True),
            "rejected_ids": draw(response_len, True), "pad_id": PAD_ID, "eos_id": EOS_ID}


def collate(data: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
    """A bpo_jax DPO batch of equal-length examples (no padding)."""
    prompt = np.asarray(data["prompt_ids"])[rows]
    batch = {}
    for side in ("chosen", "rejected"):
        resp = np.asarray(data[f"{side}_ids"])[rows]
        ids = np.concatenate([prompt, resp], axis=1).astype(np.int32)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = np.ones_like(ids)
        batch[f"{side}_loss_mask"] = np.concatenate([np.zeros_like(prompt), np.ones_like(resp)], 1).astype(np.int32)
    batch["valid"] = np.ones(len(rows), np.float32)
    return batch


class OursWorker:
    """bpo_jax's side, in its own process (served by bench.bench_mfu's MfuWorker, which adds the peak)."""

    def dpo_setup(self, model: dict, export_dir: str, data_path: str, batch_size: int, learning_rate: float,
                  beta: float, max_grad_norm: float, warmup_steps: int, lora: dict | None = None,
                  reference: str | None = None, dtype: str = "float32", seed: int = 0) -> dict:
        import jax

        from bpo_jax.config import LoraSection, OptimSection, TrainSection
        from bpo_jax.models.hf import save_hf_model
        from bpo_jax.models.llama import init_model
        from bpo_jax.models.lora import add_lora
        from bpo_jax.sampling import default_mesh
        from bpo_jax.train import DPOTrainer

        config = model_config(model, dtype=dtype)
        policy = init_model(config, seed)
        if export_dir:
            save_hf_model(policy, export_dir)  # the peer starts from these weights
        if lora:
            add_lora(policy, LoraSection(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"])), seed)
        data = json.loads(Path(data_path).read_text())
        n = len(data["prompt_ids"])
        self.batches = [collate(data, np.arange(i, i + batch_size)) for i in range(0, n, batch_size)]
        train = TrainSection(
            loss_type="sigmoid", beta=beta, batch_size=batch_size,
            reference=reference or ("lora_off" if lora else "frozen_copy"),
            optim=OptimSection(learning_rate=learning_rate, schedule="constant", max_grad_norm=max_grad_norm))
        self.trainer = DPOTrainer(policy, train, default_mesh(), total_steps=10**6)
        if train.reference == "precomputed":  # MFU: no reference forward at all
            for b in self.batches:
                b["ref_chosen_logps"] = b["ref_rejected_logps"] = np.zeros(batch_size, np.float32)
        self.state = self.trainer.init_state()
        self.tokens_per_step = self.trainer.tokens_in(self.batches[0])
        self._i = 0
        warm = self._steps(warmup_steps)  # the first step compiles
        trainable = sum(x.size for x in jax.tree.leaves(self.state.params))
        return {"warmup_s": warm, "trainable_params": int(trainable), "tokens_per_step": self.tokens_per_step,
                "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}

    def _steps(self, steps: int) -> list[float]:
        import time

        import jax

        times = []
        for _ in range(steps):
            batch = self.batches[self._i % len(self.batches)]
            self._i += 1
            start = time.perf_counter()
            self.state, metrics = self.trainer.train_step(self.state, batch)
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - start)
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError("non-finite DPO loss")
        return times

    def dpo_measure(self, steps: int) -> dict:
        before = rss_mib()
        reset_peak_rss()
        times = self._steps(steps)
        return {"seconds": times, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}


def tokens_per_second(blocks: list[dict], tokens_per_step: int) -> float:
    """Median over timed blocks of (tokens in the block / seconds of the block)."""
    return median([tokens_per_step * len(b["seconds"]) / sum(b["seconds"]) for b in blocks])


def compare_mode(size: str, lora: bool) -> list[dict]:
    """Both sides set up, then timed in alternation with the matmul peak; rows for tokens/s, peak
    memory, time to the first step and model-FLOP utilization."""
    from bench.bench_mfu import PEAK  # bench_mfu builds on this module

    s = SETTINGS[size]
    peak_args = {**PEAK[size], "dtype": "float32"}  # the dtype both sides train in
    mode = "LoRA r16" if lora else "full fine-tuning"
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        data_path = Path(tmp) / "data.json"
        n = s["batch_size"] * 4
        data_path.write_text(json.dumps(make_data(n, s["prompt_len"], s["response_len"], s["model"]["vocab_size"])))
        model_dir = str(Path(tmp) / "model")
        common = dict(data_path=str(data_path), batch_size=s["batch_size"], warmup_steps=s["warmup"],
                      lora=LORA if lora else None, **OPTIM)
        setup, blocks = against_peer_variants(
            "bench.bench_mfu", "bench.peer_trl", "TRL", "dpo_setup",  # bench_mfu's worker: the DPO one + peak
            ours_setup=dict(model=s["model"], export_dir=model_dir, **common),
            peer_setup=dict(model_dir=model_dir, max_steps=s["warmup"] + s["repeats"] * s["steps"], **common),
            measure_op="dpo_measure", measure_args={"steps": s["steps"]}, repeats=s["repeats"],
            extra={"peak": ("peak_setup", peak_args, "peak_measure")})
    peak = {"flops_per_s": max(b["flops_per_s"] for b in blocks.pop("peak")),  # the least disturbed block
            "device_kind": setup["peak"]["device_kind"],
            "what": f"{peak_args['n']}x{peak_args['n']} float32 jnp.matmul, {peak_args['repeats']} per block, "
                    "fastest of the blocks timed in the same alternation"}
    tokens = setup["bpo_jax"]["tokens_per_step"]
    rates = {name: tokens_per_second(b, tokens) for name, b in blocks.items()}
    peaks = {name: median([x["peak_rss_mib"] for x in b]) for name, b in blocks.items()}
    peers = [name for name in rates if name != "bpo_jax"]
    best = max(peers, key=rates.get)
    cfg = s["model"]
    shape = (f"vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
             f"batch {s['batch_size']} pairs x {s['prompt_len'] + s['response_len']} tokens "
             f"(prompt {s['prompt_len']} + response {s['response_len']}), float32")
    peer_info = setup[best]
    all_rates = "; ".join(f"{name}: {rates[name]:,.0f} tok/s" for name in peers)
    note = (f"{shape}; trainable params bpo_jax {setup['bpo_jax']['trainable_params']:,} / TRL "
            f"{peer_info['trainable_params']:,}; reference: {peer_info['reference']}; peer = {best} "
            f"(torch {peer_info['torch']}, transformers {peer_info['transformers']}, trl {peer_info['trl']}, "
            f"{peer_info['torch_threads']} torch threads, optimizer {peer_info['optimizer']}); all peer settings: "
            f"{all_rates}; {s['repeats']} interleaved blocks of {s['steps']} steps, median.")
    command = f"python -m bench.bench_dpo --size {size}"
    first = {name: setup[name]["warmup_s"][0] for name in rates}
    seq = s["prompt_len"] + s["response_len"]
    step_flops = dpo_step_flops(model_config(cfg), tokens, seq,
                                lora_params=setup["bpo_jax"]["trainable_params"] if lora else 0)
    achieved = {name: rates[name] / tokens * step_flops for name in rates}
    mfu_note = (f"model FLOPs per step {step_flops / 1e9:,.1f} GFLOP ({tokens} tokens; bench/flops.py: "
                + ("LoRA: policy forward 2N+A, backward through activations 2N+2A, adapters 6 x "
                   f"{setup['bpo_jax']['trainable_params']:,}" if lora else "full: policy forward + backward 6N+3A")
                + f", reference forward 2N+A; N = {matmul_params(model_config(cfg)):,} matmul weights incl. the LM "
                f"head, A = causal attention); peer column = measured {peak['device_kind']} matmul peak "
                f"({peak['what']}); ratio = MFU; {best} reaches {achieved[best] / 1e9:,.1f} GFLOP/s = "
                f"{achieved[best] / peak['flops_per_s']:.0%} of peak.")
    first_note = (f"seconds of the first train step after setup (bpo_jax: tracing + XLA compilation + the step; "
                  f"TRL: its first optimizer step inside trainer.train()); steady step {tokens / rates['bpo_jax']:.2f} s "
                  f"vs {tokens / rates[best]:.2f} s; all peer settings: "
                  + "; ".join(f"{name}: {first[name]:.1f} s" for name in peers) + ".")
    return [
        make_row(f"DPO step, {mode}: throughput", rates["bpo_jax"], rates[best], "tokens/s", command,
                 note=note, target=TARGET),
        make_row(f"DPO step, {mode}: peak RSS", peaks["bpo_jax"], peaks[best], "MiB (lower is better)", command,
                 lower_is_better=True),
        make_row(f"DPO step, {mode}: time to first step", first["bpo_jax"], first[best], "s (lower is better)",
                 command, lower_is_better=True, note=first_note),
        make_row(f"DPO step, {mode}: MFU, reference forward included", achieved["bpo_jax"] / 1e9,
                 peak["flops_per_s"] / 1e9, "GFLOP/s (peer column: measured peak)", command, note=mfu_note),
    ]


def run(size: str) -> list[dict]:
    return compare_mode(size, lora=False) + compare_mode(size, lora=True)


if __name__ == "__main__":
    bench_main(run, __doc__.splitlines()[0])
