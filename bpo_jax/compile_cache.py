"""JAX's persistent compilation cache for the command line, so a repeated or resumed run skips XLA compiles.

Turned on by `bpo_jax.main` before any heavy work, never when the library is imported: a program that
imports bpo_jax keeps its own JAX settings. $BPO_JAX_COMPILE_CACHE picks the directory, or turns the
cache off with `off` (also 0, false, no, none); unset, it is `jax/` under the asset cache
($BPO_JAX_CACHE, else ~/.cache/bpo_jax). A directory the user already gave JAX
($JAX_COMPILATION_CACHE_DIR) wins. The cache is trusted code: keep it where only you can write.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "BPO_JAX_COMPILE_CACHE"
OFF_VALUES = frozenset({"off", "0", "false", "no", "none"})
# Every compile is worth keeping: at the demo's size most compiles are well under JAX's default 1 s
# threshold, yet together they are most of a stage's start-up (docs/benchmarks.md).
MIN_COMPILE_TIME_SECS = 0.0


def compile_cache_dir() -> Path | None:
    """The directory the CLI caches compiled programs in, or None when $BPO_JAX_COMPILE_CACHE turns it off."""
    from bpo_jax.packaged_assets import cache_dir

    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    return Path(value).expanduser() if value else cache_dir() / "jax"


def enable_compile_cache() -> Path | None:
    """Point JAX's persistent cache at compile_cache_dir() (unless JAX already has one); returns the
    directory in use, None when off. Call before the first compile: later ones only are cached."""
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    directory = compile_cache_dir()
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    return directory
