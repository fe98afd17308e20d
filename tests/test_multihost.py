"""Multi-host for real: the whole pipeline under jax.distributed, several processes on loopback.

A tiny config runs every stage that touches devices or files (sft, breadth selection, sample,
score, pairs, bpo gradient features, train with checkpoints, eval) as one process with 8 CPU
devices (the reference) and as 2 processes x 4 devices with packed DPO batches (each host packs
its own rows), one process killed mid-training and then restarted with the other (a host dying:
the job restarts all processes). The multi-process results must equal the reference:
- files of the per-prompt stages (selected prompts, responses, scores, pairs, candidates, eval
  samples) byte for byte: sampling keys follow the prompt, so the split cannot change them;
- gradient features within 1e-5, train/SFT metrics per step within rtol 1e-5, final policy
  parameters within 1e-5, eval.json within 1e-6: the same math, with float32 reductions summed
  in another order across processes (measured: under 1e-6 relative);
and every run file must be written by one process, once; each process tokenizes only its share
of the prompts and builds only its rows of each global batch.
The uninterrupted 4 x 2 variant (unpacked) runs with BPO_MULTIHOST_FULL=1 (bench/bench_multihost.py
times 1, 2 and 4 processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from bpo_jax.distributed import local_process_commands

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "bpo_jax" / "assets" / "demo_sort"
WORKER = [sys.executable, str(REPO / "tests" / "multihost_worker.py")]
BYTE_EQUAL = ("selected_prompts.jsonl", "responses.jsonl", "scored.jsonl", "pairs/pairs.jsonl",
              "bpo/candidate_pairs.jsonl", "eval/policy_responses.jsonl", "eval/reference_responses.jsonl",
              "eval/policy_scored.jsonl", "eval/reference_scored.jsonl")
WRITTEN_ONCE = BYTE_EQUAL + ("train_pairs.jsonl", "eval/eval.json", "bpo/bpo_report.json", "policy", "sft_model")
TIMEOUT = 600


def head(src: Path, dst: Path, n: int) -> str:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return str(dst)


def tiny_config(root: Path) -> Path:
    """The demo pipeline at toy size: 16 prompts, 12 kept by breadth, 4 samples, 4 train steps."""
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config = {
        "run_dir": str(root / "unused"),
        "seed": 0,
        "model": {"tokenizer": str(ASSETS), "init": {**demo["model"]["init"], "hidden_size": 32,
                                                    "intermediate_size": 64, "num_hidden_layers": 1}},
        "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
        "data": {"prompts": head(ASSETS / "prompts.jsonl", root / "prompts.jsonl", 16),
                 "eval_prompts": head(ASSETS / "eval_prompts.jsonl", root / "eval_prompts.jsonl", 8),
                 "eval_pairs": head(ASSETS / "eval_pairs.jsonl", root / "eval_pairs.jsonl", 8),
                 "max_length": 32, "max_prompt_length": 16, "length_buckets": [32]},
        "sft": {"enabled": True, "data": head(ASSETS / "sft.jsonl", root / "sft.jsonl", 64), "steps": 4,
                "batch_size": 16, "learning_rate": 3.0e-3, "warmup_steps": 1},
        "sample": {"n": 4, "temperature": 1.0, "max_new_tokens": 6, "batch_size": 8},
        "reward": demo["reward"],
        "pairs": {"strategy": "max/mu-2s"},
        "bpo": {"breadth_enabled": True, "num_prompts": 12, "embedder": "policy", "depth_allocator": "gradient",
                "proj_dim": 64, "num_clusters": 2, "feature_batch_size": 8, "trainable": "layers"},
        "train": {"loss_type": "sigmoid", "beta": 1.0, "reference": "precomputed", "batch_size": 8, "max_steps": 4,
                  "checkpoint_every": 2, "optim": {"learning_rate": 1.0e-3, "warmup_steps": 1}},
        "eval": {"n": 2, "temperature": 1.0, "max_new_tokens": 6, "batch_size": 8, "num_prompts": 8},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main_args(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    args = ["--config", str(config), "--set", f"run_dir={run_dir}"]
    for o in overrides:
        args += ["--set", o]
    return args


def start(args: list[str], processes: int, devices: int, log_dir: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """Start the worker as `processes` processes x `devices` CPU devices (one process: no jax.distributed)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "BPO_TEST_LOG_DIR": str(log_dir), **(env or {})}
    if processes == 1:
        commands = [(args, {"XLA_FLAGS": f"{base.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"})]
    else:
        commands = local_process_commands(args, processes, devices)
    procs = []
    for i, (argv, extra) in enumerate(commands):
        out = open(log_dir / f"output-{i}-{time.monotonic_ns()}.log", "w")
        procs.append(subprocess.Popen(WORKER + argv, cwd=REPO, env={**base, **extra}, stdout=out, stderr=subprocess.STDOUT))
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()


def finish(procs: list[subprocess.Popen], log_dir: Path) -> None:
    """Wait for all; if one fails, stop the others (they would wait for it) and show its output."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            assert not failed and time.monotonic() < deadline, output(log_dir)[-6000:]
            time.sleep(0.2)
        assert all(p.returncode == 0 for p in procs), output(log_dir)[-6000:]
    finally:
        kill(procs)


def output(log_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(log_dir.glob("output-*.log")))


def events(log_dir: Path) -> dict[int, list[dict]]:
    return {int(p.stem.split("-")[1]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(log_dir.glob("process-*.jsonl"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (1 x 8) and a 2 x 4 run killed after train step 2 and restarted, side by side."""
    root = tmp_path_factory.mktemp("multihost")
    config = tiny_config(root)
    reference = start(main_args(config, root / "single"), 1, 8, root / "log-single")
    multi_args = main_args(config, root / "multi", "train.packing=true")
    multi = start(multi_args, 2, 4, root / "log-multi", env={"BPO_TEST_HOLD_AT_STEP": "2"})
    try:
        deadline = time.monotonic() + TIMEOUT
        committed = root / "multi" / "train" / "checkpoints" / "2"  # orbax renames it into place last
        while not ((root / "log-multi" / "holding").exists() and committed.is_dir()):
            assert all(p.poll() is None for p in multi) and time.monotonic() < deadline, output(root / "log-multi")[-6000:]
            time.sleep(0.2)
        kill(multi[1:])  # the host holding after its step-2 checkpoint dies; the other is stuck in
    finally:  # step 3 waiting for it, and the job is restarted as a whole
        kill(multi)
    assert not (root / "multi" / "policy").exists()
    restarted = start(multi_args, 2, 4, root / "log-multi")
    finish(reference, root / "log-single")
    finish(restarted, root / "log-multi")
    return root


def metrics(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k not in ("step_time", "tokens_per_second")} for r in rows}


def assert_same_run(single: Path, multi: Path) -> None:
    for name in BYTE_EQUAL:
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
    for name in ("sft/sft_metrics.jsonl", "train/train_metrics.jsonl"):
        a, b = metrics(single / name), metrics(multi / name)
        assert sorted(a) == sorted(b) == list(range(1, len(a) + 1)), name  # every step once
        for step in a:
            for key in a[step]:
                np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {step} {key}")
    features = {}
    for run in (single, multi):
        shards = [np.load(p) for p in sorted((run / "bpo" / "features").glob("features-*.npz"))]
        index = np.concatenate([s["example_index"] for s in shards])
        assert sorted(index.tolist()) == list(range(len(index)))  # each pair featurized once
        features[run] = np.concatenate([s["features"] for s in shards])[np.argsort(index)]
    np.testing.assert_allclose(features[multi], features[single], atol=1e-5)
    a, b = load_file(single / "policy" / "model.safetensors"), load_file(multi / "policy" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-5, err_msg=name)
    ea, eb = (json.loads((run / "eval" / "eval.json").read_text()) for run in (single, multi))
    assert sorted(ea) == sorted(eb)
    for key in ea:
        if key not in ("policy", "reference"):  # paths into each run directory
            np.testing.assert_allclose(eb[key], ea[key], atol=1e-6, err_msg=key)


def test_two_processes_killed_and_restarted_equal_one_process(runs):
    single, multi = runs / "single", runs / "multi"
    out = output(runs / "log-multi")
    assert "[train] resumed from the checkpoint at step 2 of 4" in out
    for stage in ("sft", "sample", "score", "pairs", "bpo"):
        assert f"[{stage}] done already" in out
    assert_same_run(single, multi)


def test_every_run_file_is_written_by_one_process_once(runs):
    multi = runs / "multi"
    writers: dict[str, set[int]] = defaultdict(set)
    renames: dict[str, int] = defaultdict(int)
    for process, log in events(runs / "log-multi").items():
        for e in (e for e in log if e["event"] in ("rename", "open")):
            path = Path(e["path"])
            if multi in path.parents and "checkpoints" not in path.parts:
                writers[str(path.relative_to(multi))].add(process)
                renames[str(path.relative_to(multi))] += e["event"] == "rename"
    assert writers, "no write recorded"
    for name, who in writers.items():
        parts = Path(name).name
        if ".parts" in name and parts[:3].isdigit():  # a process's own chunk of a resumable output
            assert who == {int(parts[:3])}, name
        elif parts.startswith("features-"):  # a process's own feature shard: numbers p, p + 2, ...
            assert who == {int(parts.split("-")[1].split(".")[0]) % 2}, name
        else:
            assert who == {0}, f"{name} written by processes {sorted(who)}"
    for name in WRITTEN_ONCE:
        assert renames[name] == 1, f"{name} put into place {renames[name]} times"
    assert not list(multi.rglob("*.tmp")) and not list(multi.rglob(".*.parts"))


def test_each_process_handles_only_its_share(runs):
    log = events(runs / "log-multi")
    assert sorted(log) == [0, 1]
    for process, records in log.items():
        # Sampling: 12 selected prompts, then 8 eval prompts for the policy and for the reference,
        # split by prompt (6 + 6, 4 + 4 each); nothing sampled twice across the restart.
        assert sum(e["n"] for e in records if e["event"] == "tokenize_prompts") == 6 + 4 + 4, process
        batches = [e for e in records if e["event"] == "batch" and e["shuffle"]]  # SFT and DPO steps
        assert batches and all(e["process_count"] == 2 and e["rows"] == e["global_rows"] // 2 for e in batches)


@pytest.mark.skipif(not os.environ.get("BPO_MULTIHOST_FULL"), reason="4 processes x 2 devices: set BPO_MULTIHOST_FULL=1")
def test_four_processes_equal_one_process(runs):
    config = runs / "tiny.yaml"
    finish(start(main_args(config, runs / "four"), 4, 2, runs / "log-four"), runs / "log-four")
    assert_same_run(runs / "single", runs / "four")
    for process, records in events(runs / "log-four").items():
        assert sum(e["n"] for e in records if e["event"] == "tokenize_prompts") == 3 + 2 + 2, process
