"""Keep freed host memory inside the process on CPU-only hosts (glibc malloc settings).

Why: XLA:CPU allocates every step's temporaries with malloc: gigabytes per DPO step at a real
model's size. glibc hands large freed blocks back to the kernel (blocks served by mmap, the
per-thread arenas' heaps, trimming of the main heap), so the next step faults the same memory in
again, one zero-filled page at a time. At SmolLM2-135M shape that was about 800,000 page faults
per step and 28% of its CPU time (docs/benchmarks.md). One arena, no mmap-served blocks and no
trimming keep the memory for the next step; the step's peak resident memory does not grow.

glibc reads these settings only when a process starts ($GLIBC_TUNABLES; `mallopt` cannot express
a trim threshold above 2 GiB), so the command line re-executes itself once with them set
(`reexec_with_tuned_malloc`). Accelerator hosts keep glibc's defaults: their steps' memory lives
on the device. $BPO_JAX_HOST_MALLOC=system turns the tuning off.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping

OPT_OUT_ENV = "BPO_JAX_HOST_MALLOC"
TUNABLES_ENV = "GLIBC_TUNABLES"
# One arena (threads share the main heap, which grows with brk and is never trimmed below its
# peak), no mmap-served blocks, and a trim threshold of 1 TiB.
TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
}
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def has_accelerator() -> bool:
    """A GPU or TPU visible to this host (device files), or JAX told to use one."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms and all(p.strip() == "cpu" for p in platforms.split(",")):
        return False
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES) or any(
        name in platforms for name in ("cuda", "gpu", "tpu", "rocm"))


def tuning_wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Linux with glibc, CPU only, not turned off by $BPO_JAX_HOST_MALLOC=system (its only value:
    any other is refused with ValueError rather than ignored)."""
    choice = env.get(OPT_OUT_ENV, "").strip().lower()
    if choice not in ("", "system"):
        raise ValueError(f"${OPT_OUT_ENV}={env[OPT_OUT_ENV]!r}: expected 'system' (keep glibc's malloc defaults) or unset")
    if choice == "system":
        return False
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and not has_accelerator()


def tuned_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with TUNABLES added to $GLIBC_TUNABLES; a setting the user already made there wins."""
    given = [item for item in env.get(TUNABLES_ENV, "").split(":") if item]
    names = {item.split("=", 1)[0] for item in given}
    added = [f"{name}={value}" for name, value in TUNABLES.items() if name not in names]
    return {**env, TUNABLES_ENV: ":".join(given + added)}


def reexec_with_tuned_malloc() -> None:
    """Restart this process (same interpreter, same arguments) with the tuned malloc, when wanted and
    not already in effect. Call first thing in a command-line entry point: it does not return then."""
    env = dict(os.environ)
    try:
        wanted = tuning_wanted(env)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not wanted:
        return
    tuned = tuned_environment(env)
    if tuned[TUNABLES_ENV] == env.get(TUNABLES_ENV):
        return  # already running with them (or the user set all of them)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, tuned)
