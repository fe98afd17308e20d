"""The CLI's persistent compilation cache: a second run loads what the first compiled; `off` sets none."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from bpo_jax.compile_cache import compile_cache_dir, enable_compile_cache

SFT = ["-m", "bpo_jax.main", "--config", "configs/demo.yaml", "--set", "mesh.data=-1", "--set", "sft.steps=2",
       "--set", "sft.batch_size=8", "sft"]
REPO = Path(__file__).resolve().parents[1]


def run_sft(tmp_path: Path, run: str, cache_setting: str | None) -> str:
    """One CLI process (its stderr returned) with its own run dir, assets cached under tmp_path;
    cache_setting None leaves $BPO_JAX_COMPILE_CACHE unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "BPO_JAX_COMPILE_CACHE")}
    env.update(BPO_JAX_CACHE=str(tmp_path / "assets"), JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1")  # hits, misses
    if cache_setting is not None:
        env["BPO_JAX_COMPILE_CACHE"] = cache_setting
    result = subprocess.run([sys.executable, *SFT, "--set", f"run_dir={tmp_path / run}"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def logged(event: str, stderr: str) -> set[str]:
    """The cache keys JAX logged with `event` ("... for 'MODULE' with key 'KEY'")."""
    return set(re.findall(re.escape(event) + r" for '[^']*' with key '([^']+)'", stderr))


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.glob("*-cache")} if directory.is_dir() else set()


def test_second_run_loads_every_program_the_first_compiled(tmp_path):
    cache = tmp_path / "assets" / "jax"  # the default under $BPO_JAX_CACHE
    first = run_sft(tmp_path, "a", None)
    written = entries(cache)
    # JAX names the key of every program it had to compile; each became one file in the directory.
    assert written and {f"{key}-cache" for key in logged("PERSISTENT COMPILATION CACHE MISS", first)} == written

    second = run_sft(tmp_path, "b", str(cache))
    assert {f"{key}-cache" for key in logged("Persistent compilation cache hit", second)} == written
    assert not logged("PERSISTENT COMPILATION CACHE MISS", second)  # nothing compiled again
    assert entries(cache) == written


@pytest.mark.parametrize("setting, expected", [
    (None, "/assets/jax"),
    ("", "/assets/jax"),
    ("/somewhere/xla", "/somewhere/xla"),
    ("off", None), ("OFF", None), ("0", None), ("false", None), ("no", None), ("none", None),
])
def test_compile_cache_dir_setting(monkeypatch, setting, expected):
    monkeypatch.setenv("BPO_JAX_CACHE", "/assets")
    if setting is None:
        monkeypatch.delenv("BPO_JAX_COMPILE_CACHE", raising=False)
    else:
        monkeypatch.setenv("BPO_JAX_COMPILE_CACHE", setting)
    assert compile_cache_dir() == (None if expected is None else Path(expected))


def test_off_leaves_jax_without_a_cache_and_a_directory_given_to_jax_itself_wins(monkeypatch, tmp_path):
    # Without a directory JAX's persistent cache is off: nothing is read or written.
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("BPO_JAX_COMPILE_CACHE", "off")
    assert enable_compile_cache() is None and jax.config.jax_compilation_cache_dir is None
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # no compile runs before it is reset
    try:
        monkeypatch.setenv("BPO_JAX_COMPILE_CACHE", str(tmp_path / "ours"))
        assert enable_compile_cache() == tmp_path / "mine"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
