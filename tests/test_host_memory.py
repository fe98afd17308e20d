"""The CPU-host malloc settings: how they merge into $GLIBC_TUNABLES, when they apply, and that the
re-executed process really keeps freed memory (re-allocating a freed block faults in no new pages)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from bpo_jax import host_memory
from bpo_jax.host_memory import OPT_OUT_ENV, TUNABLES, TUNABLES_ENV, tuned_environment, tuning_wanted

ALL = ":".join(f"{k}={v}" for k, v in TUNABLES.items())


def test_tunables_are_added_and_a_users_own_setting_wins():
    assert tuned_environment({})[TUNABLES_ENV] == ALL
    env = tuned_environment({"PATH": "/bin", TUNABLES_ENV: "glibc.malloc.arena_max=4:glibc.cpu.x86_ibt=off"})
    assert env["PATH"] == "/bin"
    items = env[TUNABLES_ENV].split(":")
    assert items[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.x86_ibt=off"]  # the user's, kept in place
    assert sorted(items[2:]) == sorted(f"{k}={v}" for k, v in TUNABLES.items() if k != "glibc.malloc.arena_max")


def test_opt_out_and_accelerators_keep_glibc_defaults(monkeypatch):
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: [])
    on_glibc_linux = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tuning_wanted({}) is on_glibc_linux
    assert not tuning_wanted({OPT_OUT_ENV: "system"})
    with pytest.raises(ValueError, match="expected 'system'"):
        tuning_wanted({OPT_OUT_ENV: "off"})  # a misspelt or other value is refused, not ignored
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not tuning_wanted({})
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert tuning_wanted({}) is on_glibc_linux
    monkeypatch.setattr(host_memory.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    monkeypatch.delenv("JAX_PLATFORMS")
    assert not tuning_wanted({})


PROBE = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np
    with open(sys.argv[1], "a") as f:
        f.write("start\\n")  # one line per process start: a re-exec adds one
    from bpo_jax.host_memory import reexec_with_tuned_malloc
    reexec_with_tuned_malloc()
    block = np.ones(64 << 20)  # 512 MiB, then freed and allocated again
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults}))
""")


@pytest.mark.skipif(not tuning_wanted(), reason="glibc Linux CPU host only")
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexecuted_process_keeps_freed_memory(tmp_path, opt_out):
    starts = tmp_path / "starts.txt"
    env = {k: v for k, v in os.environ.items() if k not in (TUNABLES_ENV, OPT_OUT_ENV)}
    if opt_out:
        env[OPT_OUT_ENV] = "system"
    out = subprocess.run([sys.executable, "-c", PROBE, str(starts)], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if opt_out:
        assert result["tunables"] is None and starts.read_text().count("start") == 1
        # glibc's default gives the freed 512 MiB back to the kernel: the new block faults pages in.
        assert result["faults"] > 100
    else:
        assert result["tunables"] == ALL and starts.read_text().count("start") == 2  # restarted exactly once
        assert result["faults"] < 10  # the freed block was kept and reused


def test_cli_refuses_an_unknown_opt_out_value():
    env = {**os.environ, OPT_OUT_ENV: "sytem"}
    out = subprocess.run([sys.executable, "-m", "bpo_jax.main", "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: ${OPT_OUT_ENV}='sytem': expected 'system' (keep glibc's malloc defaults) or unset"
    assert out.stdout == ""
