"""Test-wide setup: 8 emulated CPU devices so sharding tests run on any machine.

The flags must be set before JAX initializes its backends, hence at conftest import time.
Unsharded tests are unaffected: they run on the first device as usual. Tests use tiny models whose
run time is dominated by XLA compiles, so the CPU backend compiles without optimization passes
(about 2x faster compiles; every tolerance below still holds, as the suite shows).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# CLI runs (in-process or subprocesses) must neither write to ~/.cache nor reuse programs across tests.
os.environ["BPO_JAX_COMPILE_CACHE"] = "off"
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
