"""Reference log-prob precomputation: bpo_jax.train.precompute_reference_logps vs TRL's reference forward.

    python -m bench.bench_reference [--size cpu|smollm2|gpu]

Before DPO with reference='precomputed', every pair's summed reference log-probs are computed once
with a forward pass and no gradient. bpo_jax: `precompute_reference_logps` over the pairs in
batches, as the pipeline calls it (train.vocab_chunk at its default). Peer: what TRL's DPOTrainer
runs for each batch (`compute_ref_log_probs`): torch.no_grad, the model patched with TRL's fused
LM head (`add_fused_lm_head`: log-probs of completion tokens only, in tiles, no full logits), chosen
and rejected stacked into one batch. Same weights (bpo_jax exports them), same token ids, same batch
size; both sides' log-probs are checked equal before timing. bpo_jax runs with its command line's
malloc settings; the peer under each allocator setting of bench.common.peer_variants, the ratio
against its fastest. Pairs/s: pairs scored per second of a whole pass over the data.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_dpo import collate, make_data, model_config
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

TITLE = "Reference log-prob precomputation vs TRL's reference forward"
LOGP_RTOL = 1e-4  # |ours - TRL's| / |TRL's| of every summed log-prob
SETTINGS = {
    "cpu": {"model": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                      "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32},
            "pairs": 16, "batch_size": 4, "prompt_len": 64, "response_len": 64, "repeats": 5},
    "smollm2": {"model": SMOLLM2, "pairs": 16, "batch_size": 4, "prompt_len": 64, "response_len": 192, "repeats": 3},
    "gpu": {"model": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                      "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64},
            "pairs": 256, "batch_size": 32, "prompt_len": 256, "response_len": 256, "repeats": 5},
}


class OursWorker:
    """bpo_jax's side, in its own process (python -m bench.bench_reference --serve)."""

    def ref_setup(self, model: dict, export_dir: str, data_path: str, batch_size: int, seed: int = 0) -> dict:
        import jax

        from bpo_jax.config import TrainSection
        from bpo_jax.models.hf import save_hf_model
        from bpo_jax.models.llama import init_model
        from bpo_jax.sampling import default_mesh

        self.model = init_model(model_config(model), seed)
        save_hf_model(self.model, export_dir)  # the peer scores these weights
        data = json.loads(Path(data_path).read_text())
        n = len(data["prompt_ids"])
        self.batches = []
        for start in range(0, n, batch_size):
            batch = collate(data, np.arange(start, start + batch_size))
            batch["example_index"] = np.arange(start, start + batch_size)
            self.batches.append(batch)
        self.mesh, self.vocab_chunk = default_mesh(), TrainSection().vocab_chunk
        warm, (_, chosen, rejected) = self._reference_logps()  # compiles
        return {"warmup_s": warm, "chosen": chosen.tolist(), "rejected": rejected.tolist(),
                "vocab_chunk": self.vocab_chunk, "jax": jax.__version__}

    def _reference_logps(self):
        from bpo_jax.train import precompute_reference_logps

        start = time.perf_counter()
        result = precompute_reference_logps(self.model, self.batches, self.mesh, self.vocab_chunk)
        return time.perf_counter() - start, result

    def ref_measure(self) -> dict:
        before = rss_mib()
        reset_peak_rss()
        seconds, (index, _, _) = self._reference_logps()
        return {"seconds": seconds, "pairs": len(index), "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}


def check_equal(ours: dict, peer_logps: list[float], batch_size: int) -> float:
    """Largest relative difference of the summed log-probs; raises above LOGP_RTOL. The peer lists
    each batch's chosen rows, then its rejected rows."""
    theirs = np.asarray(peer_logps).reshape(-1, 2, batch_size)
    mine = np.stack([np.reshape(ours["chosen"], (-1, batch_size)), np.reshape(ours["rejected"], (-1, batch_size))], 1)
    rel = float(np.max(np.abs(mine - theirs) / np.abs(theirs)))
    if not rel < LOGP_RTOL:
        raise AssertionError(f"reference log-probs differ from TRL's by {rel:.2e} (relative)")
    return rel


def run(size: str) -> list[dict]:
    s = SETTINGS[size]
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        data_path = Path(tmp) / "data.json"
        data_path.write_text(json.dumps(make_data(s["pairs"], s["prompt_len"], s["response_len"],
                                                  s["model"]["vocab_size"])))
        model_dir = str(Path(tmp) / "model")
        common = dict(data_path=str(data_path), batch_size=s["batch_size"])
        setup, blocks = against_peer_variants(
            "bench.bench_reference", "bench.peer_trl", "TRL", "ref_setup",
            ours_setup=dict(model=s["model"], export_dir=model_dir, **common),
            peer_setup=dict(model_dir=model_dir, **common), measure_op="ref_measure", measure_args={},
            repeats=s["repeats"])
    peers = [name for name in blocks if name != "bpo_jax"]
    rel = max(check_equal(setup["bpo_jax"], setup[name]["logps"], s["batch_size"]) for name in peers)
    rates = {name: median([b["pairs"] / b["seconds"] for b in bs]) for name, bs in blocks.items()}
    peaks = {name: median([b["peak_rss_mib"] for b in bs]) for name, bs in blocks.items()}
    best = max(peers, key=rates.get)
    info, cfg = setup[best], s["model"]
    note = (f"vocab {cfg['vocab_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, float32; "
            f"{s['pairs']} pairs of {s['prompt_len']}+{s['response_len']} tokens in batches of {s['batch_size']} pairs; "
            f"bpo_jax vocab_chunk {setup['bpo_jax']['vocab_chunk']}; log-probs equal to TRL's within {rel:.1e} "
            f"relative (asserted < {LOGP_RTOL:g}); peer = {best} (torch {info['torch']}, transformers "
            f"{info['transformers']}, trl {info['trl']}, {info['torch_threads']} threads); all peer settings: "
            + "; ".join(f"{p}: {rates[p]:.2f} pairs/s" for p in peers)
            + f"; {s['repeats']} interleaved passes, median.")
    command = f"python -m bench.bench_reference --size {size}"
    return [
        make_row("reference log-probs: precompute throughput", rates["bpo_jax"], rates[best], "pairs/s", command,
                 note=note),
        make_row("reference log-probs: peak RSS", peaks["bpo_jax"], peaks[best], "MiB (lower is better)", command,
                 lower_is_better=True),
    ]


if __name__ == "__main__":
    if is_serve_call():
        serve(OursWorker())
    else:
        bench_main(run, __doc__.splitlines()[0])
