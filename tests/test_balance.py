"""Breadth compression and uniform balancing (bpo_jax.balance), and the pipeline's breadth step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.balance import (
    breadth_compress,
    embed_prompts,
    margin_ranked_pairs,
    policy_embeddings,
    select_representatives,
    tfidf_embeddings,
    uniform_balance,
)
from bpo_jax.config import config_from_dict
from bpo_jax.data.schema import PromptRecord
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.pipeline import Run, breadth_selection
from bpo_jax.tokenizer import Tokenizer

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "data" / "tiny_tokenizer"
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


# -- embeddings -----------------------------------------------------------------------------------------


def test_policy_embeddings_are_mean_hidden_states_of_each_unpadded_prompt():
    """Batched, sorted, padded and filler rows must not change any prompt's embedding."""
    model = init_model(ModelConfig(**TINY), seed=0)
    tok = Tokenizer.from_pretrained(TOKENIZER)
    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11 w12 w13", [{"role": "user", "content": "w7 w8"}], "w9 w9"]
    got = policy_embeddings(model, tok, prompts, batch_size=2, max_prompt_length=6)
    for prompt, row in zip(prompts, got):
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            ids = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False)
        ids = ids[-6:]  # max_prompt_length keeps the end, as sampling does
        hidden = model.hidden_states(jnp.asarray([ids]))[0]
        np.testing.assert_allclose(row, np.asarray(hidden).mean(axis=0), atol=2e-5)
    assert not np.allclose(got[0], got[4])


def test_tfidf_embeddings_put_same_topic_prompts_together():
    texts = ["the cat sat on the mat", "a cat on a mat", "stock prices fell sharply", "prices of stock rose"]
    e = tfidf_embeddings(texts, dim=2, seed=0)  # two topics: two SVD components separate them
    assert e.shape == (4, 2)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = unit @ unit.T
    assert cos[0, 1] > 0.9 and cos[2, 3] > 0.9 and abs(cos[0, 2]) < 0.2
    assert tfidf_embeddings(texts, dim=50).shape == (4, 3)  # at most documents - 1 components


def test_minilm_embedder_explains_a_missing_encoder(monkeypatch):
    monkeypatch.setitem(sys.modules, "bpo_jax.models.encoder", None)  # import now fails
    with pytest.raises(RuntimeError, match="embedder 'minilm' needs the sentence encoder.*use embedder 'policy' or 'tfidf'"):
        embed_prompts(["a prompt"], "minilm")
    with pytest.raises(ValueError, match="unknown embedder 'bert'"):
        embed_prompts(["a prompt"], "bert")
    with pytest.raises(ValueError, match="needs the policy model and its tokenizer"):
        embed_prompts(["a prompt"], "policy")


# -- breadth compression --------------------------------------------------------------------------------


def test_select_representatives_keeps_the_member_nearest_each_centroid():
    rng = np.random.default_rng(0)
    centers = np.eye(6)[:3] * 5
    x = np.concatenate([c + rng.normal(scale=0.3, size=(8, 6)) for c in centers])
    kept, labels = select_representatives(x, 3, seed=0)
    assert len(kept) == 3
    truth = np.repeat(np.arange(3), 8)
    assert np.array_equal(labels[:, None] == labels[None, :], truth[:, None] == truth[None, :])
    # Independent check: per true cluster, the member closest to the mean of its unit vectors.
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = sorted(
        int(np.flatnonzero(truth == c)[np.argmin(np.linalg.norm(unit[truth == c] - unit[truth == c].mean(0), axis=1))])
        for c in range(3)
    )
    assert kept.tolist() == expected
    assert select_representatives(x, 30)[0].tolist() == list(range(24))


def test_breadth_compress_dedupes_and_keeps_one_prompt_per_topic():
    topics = [["cat mat sat", "the cat on the mat", "cat sat mat"],
              ["stock price market", "market stock fell", "price of the stock market"],
              ["rain cloud weather", "weather with rain", "cloud rain weather today"]]
    records = [PromptRecord(str(i), t) for i, t in enumerate(t for topic in topics for t in topic)]
    records.append(PromptRecord("dup", "cat mat sat"))  # a repeated prompt counts once
    calls = []

    def embed(prompts):
        calls.append(list(prompts))
        return tfidf_embeddings(prompts, dim=8)

    kept, report = breadth_compress(records, 3, embed, seed=0)
    assert len(calls[0]) == 9  # unique prompts only
    assert report["breadth_before"] == 9 and report["breadth_after"] == 3 and report["records_in"] == 10
    words = [set(r.prompt.split()) for r in kept]
    for topic in ({"cat", "mat"}, {"stock", "market"}, {"rain", "weather"}):
        assert sum(bool(topic & w) for w in words) == 1
    assert [int(r.id) for r in kept] == sorted(int(r.id) for r in kept)  # input order

    everything, report = breadth_compress(records, 0, embed)
    assert [r.id for r in everything] == [str(i) for i in range(9)] and len(calls) == 1  # no embedding needed


def test_breadth_selection_writes_selected_prompts_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["cat mat", "cat on mat", "stock market", "market stock price", "rain weather", "weather rain cloud"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    config = config_from_dict({"run_dir": str(tmp_path / "run"), "model": {"path": "unused"},
                               "bpo": {"breadth_enabled": True, "num_prompts": 3, "embedder": "tfidf"}})
    run = Run(config)
    out = breadth_selection(run, prompts)
    assert out == run.selected_prompts
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    report = json.loads((run.root / "bpo" / "breadth_report.json").read_text())
    assert report["breadth_before"] == 6 and report["breadth_after"] == 3 and report["embedder"] == "tfidf"
    mtime = out.stat().st_mtime_ns
    assert breadth_selection(run, prompts) == out and out.stat().st_mtime_ns == mtime  # done: skipped
    off = Run(config_from_dict({"run_dir": str(tmp_path / "run2"), "model": {"path": "unused"}}))
    assert breadth_selection(off, prompts) == prompts


# -- uniform balancing ----------------------------------------------------------------------------------


def test_margin_ranked_pairs_hand_computed():
    r = [0.0, 3.0, 1.0, 2.0]
    # All pairs by margin: (1,0) 3, (1,2) 2, (3,0) 2, (1,3) 1, (2,0) 1, (3,2) 1.
    assert margin_ranked_pairs(r, 6) == [(1, 0), (1, 2), (3, 0), (1, 3), (2, 0), (3, 2)]
    assert margin_ranked_pairs(r, 3) == [(1, 0), (1, 2), (3, 0)]
    # Each response in at most one pair: (1,0), then (3,2); nothing else is disjoint.
    assert margin_ranked_pairs(r, 6, max_uses=1) == [(1, 0), (3, 2)]
    # At most two uses: (1,0), (1,2), (3,0); 1 and 0 are used up, so (2,0), (1,3) are skipped; then (3,2).
    assert margin_ranked_pairs(r, 6, max_uses=2) == [(1, 0), (1, 2), (3, 0), (3, 2)]
    assert margin_ranked_pairs([1.0, 1.0, 1.0], 2) == []  # no strict preference


def test_uniform_balance_gives_every_prompt_k_pairs():
    groups = [
        {"id": "a", "prompt": "p", "responses": ["r0", "r1", "r2", "r3"], "rewards": [0.0, 3.0, 1.0, 2.0]},
        {"id": "b", "prompt": "q", "responses": ["s0", "s1"], "rewards": [5.0, 4.0]},
    ]
    pairs, report = uniform_balance(groups, 2)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a/1-0", "r1", "r0"), ("a/1-2", "r1", "r2"), ("b/0-1", "s0", "s1")]
    assert pairs[0]["meta"]["margin"] == 3.0 and pairs[2]["meta"]["prompt_id"] == "b"
    assert report == {"k": 2, "max_uses": None, "prompts_in": 2, "pairs_out": 3, "prompts_short_of_k": 1}
