"""Test-wide setup: 8 emulated CPU devices so sharding tests run on any machine.

The flag must be set before JAX initializes its backends, hence at conftest import time.
Unsharded tests are unaffected: they run on the first device as usual.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
