"""Model FLOPs utilization of the DPO train step, against the device's measured matmul peak.

    python -m bench.bench_mfu [--size cpu|smollm2|gpu]

Model FLOPs come from the architecture (bench/flops.py: 6 N for the matmul weights, LM head
included, plus the causal attention term). The step runs with precomputed reference log-probs, so
it does exactly one forward and one backward of the policy. The peak is what a plain `jnp.matmul`
of two square matrices reaches on the same device, in the same process, timed in alternation with
the step (the fastest block: load from other jobs lowers a block, never raises it). The row reads: ours = achieved FLOP/s, peer = measured peak, ratio = MFU.

A second row bounds what the step could reach on this device: every matmul of the step
(bench/flops.py `step_matmuls`) timed alone at its shape, in blocks alternated with the other two;
model FLOPs over their summed time (fastest block) is the MFU the device's matmuls allow at this
model's shapes with no elementwise work and no idle core.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_dpo import OPTIM, SETTINGS, OursWorker, make_data, model_config
from bench.common import Worker, bench_main, interleave, is_serve_call, make_row, median, ours_environment, serve
from bench.flops import dpo_step_flops, step_matmuls

TITLE = "Model FLOPs utilization (MFU)"
# Matmul size and dtype for the peak, and the step's compute dtype, per size.
# A peak block lasts about as long as a step block (seconds on CPU), so both see the same machine load.
PEAK = {"cpu": {"n": 2048, "dtype": "float32", "repeats": 3}, "smollm2": {"n": 2048, "dtype": "float32", "repeats": 10},
        "gpu": {"n": 8192, "dtype": "bfloat16", "repeats": 20}}
STEP_DTYPE = {"cpu": "float32", "smollm2": "float32", "gpu": "bfloat16"}
CEILING_CALLS = 3  # calls per matmul shape per block, averaged


class MfuWorker(OursWorker):
    """The DPO worker plus a square matmul to measure the device's peak."""

    def peak_setup(self, n: int, dtype: str, repeats: int) -> dict:
        import jax

        keys = jax.random.split(jax.random.key(0), 2)
        self.a, self.b = (jax.random.normal(k, (n, n), dtype) for k in keys)
        self.matmul = jax.jit(lambda a, b: a @ b)
        self.n, self.repeats = n, repeats
        self.matmul(self.a, self.b).block_until_ready()  # compile
        return {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind}

    def peak_measure(self) -> dict:
        start = time.perf_counter()
        for _ in range(self.repeats):
            out = self.matmul(self.a, self.b)
        out.block_until_ready()
        seconds = time.perf_counter() - start
        return {"flops_per_s": 2 * self.n**3 * self.repeats / seconds}

    def ceiling_setup(self, model: dict, rows: int, seq_len: int, dtype: str) -> dict:
        import jax
        import jax.numpy as jnp

        self.step_matmuls, key = [], jax.random.key(1)
        for _, count, spec, lhs, rhs in step_matmuls(model_config(model), rows, seq_len):
            key, ka, kb = jax.random.split(key, 3)
            a, b = jax.random.normal(ka, lhs, dtype), jax.random.normal(kb, rhs, dtype)
            matmul = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b))
            matmul(a, b).block_until_ready()  # compile
            self.step_matmuls.append((count, matmul, a, b))
        return {"shapes": len(self.step_matmuls)}

    def ceiling_measure(self) -> dict:
        """Seconds of one step's matmuls, each timed alone at its shape."""
        seconds = 0.0
        for count, matmul, a, b in self.step_matmuls:
            start = time.perf_counter()
            for _ in range(CEILING_CALLS):
                out = matmul(a, b)
            out.block_until_ready()
            seconds += count * (time.perf_counter() - start) / CEILING_CALLS
        return {"seconds": seconds}


def run(size: str) -> list[dict]:
    s, peak = SETTINGS[size], PEAK[size]
    seq = s["prompt_len"] + s["response_len"]
    with tempfile.TemporaryDirectory(prefix="bench-mfu-") as tmp:
        data_path = Path(tmp) / "data.json"
        data_path.write_text(json.dumps(
            make_data(s["batch_size"] * 4, s["prompt_len"], s["response_len"], s["model"]["vocab_size"])))
        with Worker("bpo_jax", sys.executable, "bench.bench_mfu", ours_environment()) as w:
            setup = w.call("dpo_setup", model=s["model"], export_dir="", data_path=str(data_path),
                           batch_size=s["batch_size"], warmup_steps=s["warmup"], reference="precomputed",
                           dtype=STEP_DTYPE[size], **OPTIM)
            device = w.call("peak_setup", **peak)
            ceiling_shapes = w.call("ceiling_setup", model=s["model"], rows=setup["tokens_per_step"] // seq,
                                    seq_len=seq, dtype=STEP_DTYPE[size])["shapes"]
            blocks = interleave({"step": lambda: w.call("dpo_measure", steps=s["steps"]),
                                 "peak": lambda: w.call("peak_measure"),
                                 "ceiling": lambda: w.call("ceiling_measure")}, s["repeats"])
    config = model_config(s["model"])
    tokens = setup["tokens_per_step"]
    flops_per_token = dpo_step_flops(config, tokens, seq, reference_forward=False) / tokens
    achieved = median([tokens * len(b["seconds"]) / sum(b["seconds"]) for b in blocks["step"]]) * flops_per_token
    peak_flops = max(b["flops_per_s"] for b in blocks["peak"])  # the least disturbed block: MFU errs low
    note = (f"{device['device_kind']} ({device['device']}); model {config.num_params():,} params, "
            f"{flops_per_token / 1e6:,.1f} MFLOP/token at {seq} tokens (6N + attention), step in {STEP_DTYPE[size]}, "
            f"full fine-tuning, reference log-probs precomputed; peak = {peak['n']}x{peak['n']} {peak['dtype']} "
            f"jnp.matmul, the fastest block; step: {s['repeats']} interleaved blocks, median. ratio = MFU.")
    ceiling = flops_per_token * tokens / min(b["seconds"] for b in blocks["ceiling"])
    ceiling_note = (f"the step's {ceiling_shapes} matmul shapes (bench/flops.py "
                    f"step_matmuls: projections, LM head and attention dots, forward and backward) each timed alone, "
                    f"{CEILING_CALLS} calls per block, fastest of {s['repeats']} blocks; ours = model FLOPs / their "
                    f"summed time; ratio = the highest MFU this device's matmuls allow at these shapes.")
    command = f"python -m bench.bench_mfu --size {size}"
    return [make_row("MFU: DPO train step, achieved vs peak matmul", achieved / 1e9, peak_flops / 1e9,
                     "GFLOP/s (peer column: measured peak)", command, note=note),
            make_row("MFU ceiling: the step's matmuls alone vs peak matmul", ceiling / 1e9, peak_flops / 1e9,
                     "GFLOP/s (peer column: measured peak)", command, note=ceiling_note)]


if __name__ == "__main__":
    if is_serve_call():
        serve(MfuWorker())
    else:
        bench_main(run, __doc__.splitlines()[0])
