"""Benchmark plumbing shared by every bench module and by the peer worker.

Standard library only: the peer side (bench/peer_trl.py) imports this module from its own virtual
environment, where neither JAX nor bpo_jax is installed.

How a side-by-side measurement works: each side (ours, the peer) runs in its own worker process
(`Worker`), driven over stdin/stdout with one JSON object per line. Both workers are set up (models
built, code compiled, warm-up done) before any timing; then `interleave` asks them for one timed
block after the other, alternating which goes first, so a change in machine load hits both
sides alike. Each side's figure is the median over the blocks. Separate processes also give each
side a clean peak-memory reading (the kernel's peak RSS counter is reset before each block).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
# cpu: a toy that fits the 2-core CI machine; smollm2: the shape of the model this project ships
# (SmolLM2-135M), on CPU; gpu: a GPU/TPU host.
SIZES = ("cpu", "smollm2", "gpu")
# SmolLM2-135M's architecture (its config.json), random weights: a bench model spec (bench_dpo.model_config).
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True,
           "rope_theta": 100000.0}

PEER_VENV = REPO / "bench" / ".peer-venv"
PEER_PYTHON_ENV = "BPO_BENCH_PEER_PYTHON"  # use this interpreter for the peer instead of creating a venv
# Installed in that order: the CPU torch wheel first, so the others do not pull a CUDA build.
PEER_REQUIREMENTS = (("torch==2.13.0",), ("transformers==5.23.0", "trl==1.16.0", "peft==0.21.2"))
JEMALLOC_ENV = "BPO_BENCH_JEMALLOC"  # path of libjemalloc.so to preload into the peer
# $GLIBC_TUNABLES as the user gave it, saved before `tune_this_process` re-executes the driver with
# bpo_jax's malloc settings; the peer's untuned variants get this value back.
UNTUNED_ENV = "BPO_BENCH_UNTUNED_GLIBC_TUNABLES"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so")


# -- the peer's environment ----------------------------------------------------------------------
def peer_python() -> str:
    """The interpreter of the peer's virtual environment (PyTorch, transformers, TRL, PEFT).

    $BPO_BENCH_PEER_PYTHON when set; otherwise bench/.peer-venv, created on first use.
    """
    given = os.environ.get(PEER_PYTHON_ENV)
    if given:
        if not Path(given).exists():
            raise FileNotFoundError(f"${PEER_PYTHON_ENV}={given}: no such interpreter")
        return given
    python = PEER_VENV / "bin" / "python"
    ready = PEER_VENV / ".installed"
    if not ready.exists():
        print(f"creating the peer environment in {PEER_VENV} (one time)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
        for group in PEER_REQUIREMENTS:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", *group], check=True)
        ready.write_text("\n".join(" ".join(g) for g in PEER_REQUIREMENTS) + "\n")
    return str(python)


def jemalloc_path() -> str | None:
    """A jemalloc shared library to LD_PRELOAD into the peer ($BPO_BENCH_JEMALLOC, else a system one)."""
    given = os.environ.get(JEMALLOC_ENV)
    if given:
        return given if Path(given).exists() else None
    return next((p for p in JEMALLOC_PATHS if Path(p).exists()), None)


def untuned_glibc_tunables() -> str | None:
    """$GLIBC_TUNABLES as the user set it (None: unset), even after `tune_this_process` changed it."""
    saved = os.environ.get(UNTUNED_ENV)
    if saved is None:
        return os.environ.get("GLIBC_TUNABLES")
    return saved or None  # "": it was not set


def ours_environment() -> dict[str, str | None]:
    """Environment overrides for bpo_jax's side: the malloc settings its command line runs with
    (bpo_jax.host_memory), so the bench measures what a user gets."""
    from bpo_jax import host_memory  # standard library only; the peer never calls this

    base = {**os.environ, "GLIBC_TUNABLES": untuned_glibc_tunables()}
    base = {k: v for k, v in base.items() if v is not None}
    if not host_memory.tuning_wanted(base):
        return {"GLIBC_TUNABLES": untuned_glibc_tunables()}
    return {"GLIBC_TUNABLES": host_memory.tuned_environment(base)["GLIBC_TUNABLES"]}


def tune_this_process() -> None:
    """Re-execute this driver with bpo_jax's malloc settings (as its CLI does), so a bpo_jax side that
    runs in the driver itself (bench_gradients, bench_logps) gets them too. The user's own
    $GLIBC_TUNABLES is kept in $BPO_BENCH_UNTUNED_GLIBC_TUNABLES for the peer."""
    from bpo_jax import host_memory

    os.environ.setdefault(UNTUNED_ENV, os.environ.get("GLIBC_TUNABLES", ""))
    host_memory.reexec_with_tuned_malloc()


def peer_variants() -> dict[str, dict[str, str | None]]:
    """The allocator settings the peer is measured under (environment overrides; None unsets):
    glibc malloc, jemalloc when present, and glibc with bpo_jax's own settings when bpo_jax uses them.

    PyTorch on CPU is allocator-bound on large-vocabulary logits, so the peer is compared at its best,
    and it is offered every allocator setting bpo_jax itself gets.
    """
    untuned = {"GLIBC_TUNABLES": untuned_glibc_tunables()}
    variants = {"glibc malloc": untuned}
    jemalloc = jemalloc_path()
    if jemalloc:
        variants["jemalloc"] = {**untuned, "LD_PRELOAD": jemalloc}
    ours = ours_environment()
    if ours != untuned:
        variants["glibc tuned (as bpo_jax)"] = ours
    return variants


# -- memory (Linux /proc) ------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mib() -> float:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process since start or the last `reset_peak_rss`."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter, so setup and compilation do not count in the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- worker processes ----------------------------------------------------------------------------
class WorkerError(RuntimeError):
    """A worker process failed; the message carries its error and the tail of its stderr."""


class Worker:
    """A benchmark side in its own process: `python -m <module> --serve`, one JSON request per line."""

    def __init__(self, name: str, python: str, module: str, env: dict[str, str | None] | None = None):
        """`env`: overrides of this process's environment; a None value removes the variable."""
        self.name = name
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.log_path = self._log.name
        self._proc = subprocess.Popen(
            [python, "-m", module, "--serve"],
            cwd=REPO,
            env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def call(self, op: str, **kwargs: Any) -> dict:
        """Send one request and wait for its answer."""
        if not op.endswith("measure"):
            print(f"[bench]   {self.name}: {op}", file=sys.stderr, flush=True)
        try:
            self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise WorkerError(f"worker {self.name} exited during {op!r}:\n{self._stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"worker {self.name} failed in {op!r}: {reply['error']}\n{self._stderr_tail()}")
        return reply

    def _stderr_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()
        os.unlink(self.log_path)

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(handler: object) -> None:
    """Worker side: answer requests from stdin with `handler.<op>(**kwargs)`, one JSON line each.

    Library output that goes to stdout (progress bars, prints) is diverted to stderr so it cannot
    corrupt the protocol.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = getattr(handler, op)(**request)
        except Exception as e:  # reported to the driver, which raises WorkerError
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def is_serve_call(argv: Sequence[str] | None = None) -> bool:
    return "--serve" in (sys.argv[1:] if argv is None else argv)


def bench_main(run: Callable[[str], list[dict]], description: str, argv: Sequence[str] | None = None) -> list[dict]:
    """The command line of one bench module: `--size`, then the rows as a markdown table."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", default="cpu", choices=SIZES)
    args = parser.parse_args(argv)
    tune_this_process()
    rows = run(args.size)
    print(markdown_table(rows))
    for r in rows:
        if r.get("note"):
            print(f"- {r['workload']}: {r['note']}")
    return rows


# -- timing --------------------------------------------------------------------------------------
def against_peer_variants(
    ours_module: str,
    peer_module: str,
    peer_label: str,
    setup_op: str,
    ours_setup: dict[str, Any],
    peer_setup: dict[str, Any],
    measure_op: str,
    measure_args: dict[str, Any],
    repeats: int,
    extra: dict[str, tuple[str, dict[str, Any], str]] | None = None,
) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """bpo_jax's worker (`ours_module --serve` in this interpreter) and one peer worker per
    allocator setting (`peer_variants`), each set up with `setup_op`, then `measure_op` timed on
    all of them in alternation. `extra`: more timed sides on bpo_jax's worker, name -> (setup op,
    its arguments, measure op), in the same alternation (e.g. the matmul peak, so machine load
    hits it alike). Returns (setup replies, timed blocks), keyed "bpo_jax", "<peer_label>
    (<variant>)" and the names in `extra`."""
    ours = Worker("bpo_jax", sys.executable, ours_module, ours_environment())
    workers, sides = {"bpo_jax": ours}, {"bpo_jax": lambda: ours.call(measure_op, **measure_args)}
    try:
        setup = {"bpo_jax": ours.call(setup_op, **ours_setup)}
        for name, (op, args, measure) in (extra or {}).items():
            setup[name] = ours.call(op, **args)
            sides[name] = lambda m=measure: ours.call(m)
        python = peer_python()
        for variant, env in peer_variants().items():
            name = f"{peer_label} ({variant})"
            workers[name] = w = Worker(name, python, peer_module, env)
            setup[name] = w.call(setup_op, **peer_setup)
            sides[name] = lambda w=w: w.call(measure_op, **measure_args)
        blocks = interleave(sides, repeats)
    finally:
        for w in workers.values():
            w.close()
    return setup, blocks


def interleave(sides: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Call each side's timed block `repeats` times, alternating the order (ABBA...)."""
    names = list(sides)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            seconds, result = timed(sides[name])
            results[name].append(result)
            print(f"[bench]   block {rep + 1}/{repeats} {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -- rows and the report -------------------------------------------------------------------------
def make_row(
    workload: str,
    ours: float,
    peer: float,
    unit: str,
    command: str,
    *,
    lower_is_better: bool = False,
    note: str = "",
    target: float | None = None,
) -> dict:
    """One table row; `ratio` is how many times better ours is (ours/peer, or peer/ours when lower
    is better); `target` is the ratio the issue asks for, if any."""
    ratio = (peer / ours if lower_is_better else ours / peer) if ours and peer else float("nan")
    return {"workload": workload, "ours": ours, "peer": peer, "ratio": ratio, "unit": unit,
            "command": command, "note": note, "target": target}


def machine_description() -> dict[str, str]:
    """What the numbers were measured on: CPU, cores usable, memory, OS, Python, load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kib = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                       if l.startswith("MemTotal:"))
        memory = f"{mem_kib / 1024**2:.1f} GiB"
    except (OSError, StopIteration):
        memory = "unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "cpu": f"{cpu} ({os.cpu_count()} logical CPUs, {usable} usable)",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load average (1/5/15 min) at start": load,
    }


def _fmt(x: float) -> str:
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| workload | ours | peer | ratio | target | unit | command |", "|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        target = r.get("target")
        verdict = "" if target is None else f">= {target:g}x: {'met' if r['ratio'] >= target else 'MISSED'}"
        lines.append(f"| {r['workload']} | {_fmt(r['ours'])} | {_fmt(r['peer'])} | {_fmt(r['ratio'])}x "
                     f"| {verdict} | {r['unit']} | `{r['command']}` |")
    return "\n".join(lines)
