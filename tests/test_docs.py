"""The documentation shows what the code does: README's library example is examples/library_dpo.py
and runs; docs/configuration.md is the reference generated from the config dataclasses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from bpo_jax.config import config_reference_markdown

REPO = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_library_example_is_the_example_file_and_it_trains():
    example = REPO / "examples" / "library_dpo.py"
    body = example.read_text().split('"""', 2)[2].strip()  # without the module docstring
    assert body in [block.strip() for block in readme_python_blocks()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    after = eval(out.stdout.split("after 20 steps:")[1].strip())  # the printed metrics dict
    assert after["rewards/accuracies"] == 1.0 and after["loss"] < 0.5  # 0.693 at the start


def test_configuration_reference_is_current():
    assert (REPO / "docs" / "configuration.md").read_text() == config_reference_markdown()
