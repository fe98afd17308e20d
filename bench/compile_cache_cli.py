"""The CLI's persistent compilation cache, measured: the demo's `sft` then `sample` stages, run twice in
fresh processes and a fresh run dir each time (the cache kept), with the cache off, on as shipped
(every compile kept), and on with JAX's default 1 s minimum compile time.

    python -m bench.compile_cache_cli [--reps N]     (prints one JSON line per process)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "sample")  # `sample` reads sft's model: the second process of each run resumes the run dir
# tqdm's first update: "1/20 [00:02<00:49,  2.61s/step" or, under a second, "1/20 [00:00<00:09,  1.97step/s".
FIRST_STEP = re.compile(r"sft:\s+5%.*? 1/20 \[[^,]*,\s*([0-9.]+)(s/step|step/s)")


def stage_process(stage: str, run_dir: Path, env: dict[str, str]) -> tuple[float, float | None]:
    """Wall seconds of one CLI process, and the seconds to sft's first step (None for other stages)."""
    cmd = [sys.executable, "-m", "bpo_jax.main", "--config", "configs/demo.yaml", "--set", f"run_dir={run_dir}",
           "--set", "sft.steps=20", stage]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    match = FIRST_STEP.search(done.stderr)
    first = None if not match else float(match.group(1)) if match.group(2) == "s/step" else 1 / float(match.group(1))
    return wall, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=1)
    reps = parser.parse_args().reps
    scratch = Path(tempfile.mkdtemp(prefix="bench_compile_cache_"))
    cache, run_dir = scratch / "cache", scratch / "run"
    base = {k: v for k, v in os.environ.items() if k not in ("BPO_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    modes = {"off": {"BPO_JAX_COMPILE_CACHE": "off"},
             "on (shipped: every compile kept)": {"BPO_JAX_COMPILE_CACHE": str(cache)},
             "on (JAX's default: compiles over 1 s kept)": {"JAX_COMPILATION_CACHE_DIR": str(cache)}}
    try:
        for rep in range(reps):
            for mode, extra in modes.items():
                shutil.rmtree(cache, ignore_errors=True)
                for run in ("1st", "2nd"):
                    shutil.rmtree(run_dir, ignore_errors=True)
                    for stage in STAGES:
                        wall, first = stage_process(stage, run_dir, base | extra)
                        entries = len(list(cache.glob("*-cache"))) if cache.is_dir() else 0
                        print(json.dumps(dict(rep=rep, mode=mode, run=run, stage=stage, wall_s=round(wall, 2),
                                              first_step_s=None if first is None else round(first, 2),
                                              cache_entries=entries)), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
