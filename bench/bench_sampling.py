"""Sampling throughput: bpo_jax.sampling.generate vs transformers' generate, same model and settings.

    python -m bench.bench_sampling [--size cpu|smollm2|gpu]

Both sides load the same weights (bpo_jax exports them with `save_hf_model`), take the same
prompt ids (no padding), draw n samples per prompt with the same temperature / top-k / top-p,
and generate exactly max_new_tokens per row (the exported config has no EOS, so no row stops
early on either side). Throughput is generated tokens per second of one whole call (prefill
included, compilation excluded by a warm-up call); transformers runs with its default (dynamic)
KV cache under torch.inference_mode, under glibc malloc, jemalloc when found, and glibc with
bpo_jax's malloc settings (the ratio is taken against its fastest setting); bpo_jax runs with the
malloc settings its command line uses.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_dpo import model_config
from bench.common import (
    SMOLLM2,
    against_peer_variants,
    bench_main,
    is_serve_call,
    make_row,
    median,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    serve,
)

TITLE = "Sampling vs transformers generate"
TARGET = 1.0  # faster than transformers

SETTINGS = {
    "cpu": {"model": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                      "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32},
            "prompts": 8, "prompt_len": 32, "n": 4, "max_new_tokens": 64, "repeats": 5},
    "gpu": {"model": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                      "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64},
            "prompts": 32, "prompt_len": 128, "n": 8, "max_new_tokens": 256, "repeats": 5},
    "smollm2": {"model": SMOLLM2, "prompts": 4, "prompt_len": 32, "n": 4, "max_new_tokens": 128, "repeats": 3},
}
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}


class OursWorker:
    """bpo_jax's side, in its own process (python -m bench.bench_sampling --serve)."""

    def gen_setup(self, model: dict, export_dir: str, prompt_ids: list[list[int]], n: int, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, seed: int = 0) -> dict:
        import jax

        from bpo_jax.models.hf import save_hf_model
        from bpo_jax.models.llama import init_model
        from bpo_jax.sampling import SamplingConfig

        self.model = init_model(model_config(model).replace(eos_token_id=None), seed)
        save_hf_model(self.model, export_dir)
        self.prompts = prompt_ids
        self.cfg = SamplingConfig(n=n, temperature=temperature, top_k=top_k, top_p=top_p,
                                  max_new_tokens=max_new_tokens, batch_size=len(prompt_ids), seed=seed)
        warm, _ = self._generate()  # compiles
        return {"warmup_s": warm, "jax": jax.__version__}

    def _generate(self):
        from bpo_jax.sampling import generate

        start = time.perf_counter()
        result = generate(self.model, self.prompts, self.cfg, progress=False)
        return time.perf_counter() - start, result

    def gen_measure(self) -> dict:
        before = rss_mib()
        reset_peak_rss()
        seconds, result = self._generate()
        new_tokens = int(result.num_tokens.sum())
        expected = len(self.prompts) * self.cfg.n * self.cfg.max_new_tokens
        if new_tokens != expected:
            raise RuntimeError(f"generated {new_tokens} tokens, expected {expected}")
        return {"seconds": seconds, "new_tokens": new_tokens, "rss_before_mib": before,
                "peak_rss_mib": peak_rss_mib()}


def run(size: str) -> list[dict]:
    s = SETTINGS[size]
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(3, s["model"]["vocab_size"], size=(s["prompts"], s["prompt_len"])).tolist()
    spec = dict(prompt_ids=prompt_ids, n=s["n"], max_new_tokens=s["max_new_tokens"], **SAMPLING)
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp:
        model_dir = str(Path(tmp) / "model")
        setup, blocks = against_peer_variants(
            "bench.bench_sampling", "bench.peer_trl", "transformers", "gen_setup",
            ours_setup=dict(model=s["model"], export_dir=model_dir, **spec), peer_setup=dict(model_dir=model_dir, **spec),
            measure_op="gen_measure", measure_args={}, repeats=s["repeats"])
    rates = {name: median([b["new_tokens"] / b["seconds"] for b in bs]) for name, bs in blocks.items()}
    peers = [name for name in rates if name != "bpo_jax"]
    best = max(peers, key=rates.get)
    info = setup[best]
    cfg = s["model"]
    note = (f"vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, float32; "
            f"{s['prompts']} prompts x {s['prompt_len']} tokens, n = {s['n']} samples each "
            f"({s['prompts'] * s['n']} rows), {s['max_new_tokens']} new tokens per row, temperature "
            f"{SAMPLING['temperature']}, top_k {SAMPLING['top_k']}, top_p {SAMPLING['top_p']}; peer = {best} "
            f"(torch {info['torch']}, transformers {info['transformers']}, {info['torch_threads']} threads); "
            "all peer settings: " + "; ".join(f"{p}: {rates[p]:,.0f} tok/s" for p in peers)
            + f"; {s['repeats']} interleaved calls, median.")
    return [make_row("sampling: generated tokens/s", rates["bpo_jax"], rates[best], "tokens/s",
                     f"python -m bench.bench_sampling --size {size}", note=note, target=TARGET)]


if __name__ == "__main__":
    if is_serve_call():
        serve(OursWorker())
    else:
        bench_main(run, __doc__.splitlines()[0])
