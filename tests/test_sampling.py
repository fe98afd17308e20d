"""On-policy sampling: the sampling distribution, KV-cache decoding, parity with transformers'
greedy generate, seeding, sharding, and the resumable sample stage."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from bpo_jax import sampling
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.hf import load_hf_model
from bpo_jax.models.llama import init_model
from bpo_jax.resumable import ResumeError
from bpo_jax.sampling import (
    DecodeSpec,
    SamplingConfig,
    SamplingConfigError,
    decode_batch,
    default_mesh,
    generate,
    inverse_cdf_sample,
    pad_tokens,
    sample_stage,
    sample_tokens,
    sampling_logprobs,
)
from bpo_jax.data.schema import DataError
from bpo_jax.data.tokenize import RaggedTokens
from bpo_jax.sharding import make_mesh, shard_model
from bpo_jax.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HF = FIXTURES / "hf"


@functools.cache
def hf_model(name: str):
    return load_hf_model(HF / name)


@functools.cache
def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(HF / name / "reference.npz") as f:
        return dict(f)


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def plain_forward(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits of an ordinary forward pass (no cache), the reference for decoding. Compiled without
    backend optimization: an eager forward costs more than this compile."""
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def fixture_prompts(name: str) -> list[list[int]]:
    ref = reference(name)
    return [row[m.astype(bool)].tolist() for row, m in zip(ref["greedy_prompt_ids"], ref["greedy_prompt_mask"])]


# -- the sampling distribution ------------------------------------------------------------------
def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, top-k, then top-p on the renormalized top-k distribution, written out by hand."""
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    kept = order[: top_k or len(x)]
    p = np.exp(x[kept] - x[kept].max())
    p /= p.sum()
    if top_p < 1:
        mass, n = 0.0, 0
        while mass < top_p:  # the smallest prefix whose mass reaches top_p
            mass += p[n]
            n += 1
        kept = kept[:n]
    out = np.zeros_like(x)
    out[kept] = np.exp(x[kept] - x[kept].max())
    return out / out.sum()


LOGITS = np.random.default_rng(0).normal(0, 2, 12).astype(np.float32)
SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.5, 5, 1.0), (1.0, 6, 0.6), (2.0, 0, 0.3)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampling_distribution_matches_hand_computed(temperature, top_k, top_p):
    want = reference_probs(LOGITS, temperature, top_k, top_p)
    got = np.exp(np.asarray(sampling_logprobs(jnp.asarray(LOGITS), temperature, top_k, top_p), np.float64))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0 < (want > 0).sum() < len(LOGITS) or (top_k, top_p) == (0, 1.0)  # the filters did filter


def test_top_p_always_keeps_the_top_token():
    logits = jnp.asarray([0.0, 5.0, 1.0])  # top token holds ~97% > top_p
    probs = np.exp(np.asarray(sampling_logprobs(logits, 1.0, 0, 0.01)))
    np.testing.assert_allclose(probs, [0, 1, 0], atol=0)


def test_filters_keep_ties_with_the_last_kept_token():
    # top_k = 2 over [3, 1, 1, 1, 0, -2]: the three 1s tie for second place and all stay.
    probs = np.exp(np.asarray(sampling_logprobs(jnp.asarray([3.0, 1, 1, 1, 0, -2]), 1.0, 2, 1.0), np.float64))
    e = np.exp([3.0, 1, 1, 1])
    np.testing.assert_allclose(probs, np.concatenate([e / e.sum(), [0, 0]]), atol=1e-6)
    # top_p = 0.8 over [2, 0, 0, -1]: p = 0.757, 0.103, 0.103, 0.038; the mass before the first 0
    # is 0.757 < 0.8, so 0 is the cutoff and both 0s stay.
    probs = np.exp(np.asarray(sampling_logprobs(jnp.asarray([2.0, 0, 0, -1]), 1.0, 0, 0.8), np.float64))
    e = np.exp([2.0, 0, 0])
    np.testing.assert_allclose(probs, np.concatenate([e / e.sum(), [0]]), atol=1e-6)


def test_inverse_cdf_sample_inverts_the_cumulative_distribution():
    rng = np.random.default_rng(0)
    probs = rng.random((400, 1000)) ** 4  # 1000 = 3 full blocks of 256 and a padded one
    probs[:, ::3] = 0
    probs[:, 990:] = 0  # zeros at the end: u near 1 must not land there
    u = rng.random(400)
    u[:3] = [0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5]
    got = np.asarray(inverse_cdf_sample(jnp.asarray(probs, jnp.float32), jnp.asarray(u, jnp.float32)))
    cdf = np.cumsum(probs, axis=1)  # float64 reference: the first index whose cdf exceeds u * total
    want = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1)
    np.testing.assert_array_equal(got[2:], want[2:])
    assert got[0] == np.flatnonzero(probs[0])[0] and got[1] == np.flatnonzero(probs[1])[-1]
    assert (probs[np.arange(400), got] > 0).all()


def test_filters_at_full_vocabulary_size():
    logits = np.random.default_rng(1).normal(0, 3, (3, 32000)).astype(np.float32)
    got = np.exp(np.asarray(sampling_logprobs(jnp.asarray(logits), 0.9, 50, 0.9), np.float64))
    want = np.stack([reference_probs(row, 0.9, 50, 0.9) for row in logits])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert all(1 < (w > 0).sum() < 50 for w in want)


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS[1:4])
def test_sample_frequencies_follow_the_distribution(temperature, top_k, top_p):
    """20k draws: chi-square goodness of fit at p = 0.001 (fixed keys, so deterministic), no excluded token."""
    draws = 20_000
    keys = jax.random.split(jax.random.key(7), draws)
    tokens = jax.jit(sample_tokens, static_argnums=(2, 3, 4))(
        jnp.broadcast_to(LOGITS, (draws, len(LOGITS))), keys, temperature, top_k, top_p
    )
    counts = np.bincount(np.asarray(tokens), minlength=len(LOGITS))
    probs = reference_probs(LOGITS, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    chi2 = (((counts - draws * probs) ** 2)[kept] / (draws * probs[kept])).sum()
    assert chi2 < stats.chi2.ppf(0.999, kept.sum() - 1), (chi2, counts, probs)


def chi2_fits(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Goodness of fit at p = 0.001 over the tokens with probability > 0."""
    kept = probs > 0
    expected = counts.sum() * probs[kept]
    return ((counts[kept] - expected) ** 2 / expected).sum() < stats.chi2.ppf(0.999, kept.sum() - 1)


def test_generate_draws_follow_the_model_distribution():
    """End to end through the decode loop: 4000 samples of one prompt. The first tokens follow
    temperature + top-k + top-p over a plain forward's last logits; the second tokens, among the
    samples that began with the commonest first token, follow the distribution after it (fresh
    keys per sample and per step). Excluded tokens never appear."""
    model = hf_model("llama_gqa")
    prompt, draws = [5, 6, 7, 8], 4000
    cfg = SamplingConfig(n=draws, temperature=1.3, top_k=12, top_p=0.8, max_new_tokens=2, batch_size=1, seed=5)
    tokens = generate(model, [prompt], cfg, progress=False).tokens[0]
    first = np.array([seq[0] for seq in tokens])
    stops = set(model.config.eos_token_ids)
    top = int(np.bincount(first[~np.isin(first, list(stops))]).argmax())
    second = np.array([seq[1] for seq in tokens if seq[0] == top])

    ids = np.array([[0] + prompt, prompt + [top]], np.int32)  # row 0 left-padded to the same length
    mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    logits = plain_forward(model, ids, mask)[:, -1]
    for drawn, row in ((first, logits[0]), (second, logits[1])):
        probs = reference_probs(row, cfg.temperature, cfg.top_k, cfg.top_p)
        assert 1 < (probs > 0).sum() < cfg.top_k  # top-p cut inside the top-k set
        counts = np.bincount(drawn, minlength=len(probs))
        assert counts[probs == 0].sum() == 0, np.flatnonzero(counts * (probs == 0))
        assert chi2_fits(counts, probs), (counts[probs > 0], probs[probs > 0])
    assert len(second) > 500


def test_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 12)), jnp.float32)
    got = sample_tokens(logits, jax.random.split(jax.random.key(0), 5), 0.0)
    np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), axis=-1))


def test_config_errors_name_the_field():
    with pytest.raises(SamplingConfigError, match="sampling.top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(SamplingConfigError, match="sampling.n"):
        SamplingConfig(n=0)


# -- decoding ------------------------------------------------------------------------------------
def test_kv_cache_decoding_equals_full_recomputation():
    """Every step's logits equal a plain forward over the left-padded prefix; rows stop at a stop id."""
    model = hf_model("llama_gqa")
    prompts = RaggedTokens.from_lists([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15]])
    ids, mask = pad_tokens(prompts, 8, "left")
    m, stop = 10, tuple(range(3, 128, 6))  # a sixth of the vocabulary stops: some rows end early
    spec = DecodeSpec(max_new_tokens=m, temperature=1.0, top_k=0, top_p=1.0, stop_ids=stop, return_logits=True)
    valid = np.array([True, True, True])
    out = decode_batch(model, ids, mask, np.arange(3), np.zeros(3), valid, 0, spec, default_mesh())

    full_ids = np.concatenate([ids, out.tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
    full = plain_forward(model, full_ids, full_mask)
    for row in range(3):
        n = out.lengths[row]
        np.testing.assert_allclose(out.logits[row, :n], full[row, 7 : 7 + n], atol=1e-4, rtol=0)
        gen = out.tokens[row]
        is_stop = np.isin(gen[:n], stop)
        assert out.finished[row] == is_stop[-1] and not is_stop[:-1].any()
        assert (gen[n:] == 0).all() and (n == m or out.finished[row])
    assert out.finished.any() and out.lengths.max() > 1  # the stop path and the loop both ran


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_tied"])
def test_greedy_matches_transformers(name):
    """transformers' greedy tokens (left-padded batch, no early stop) up to and including our EOS stop."""
    want = reference(name)["greedy_ids"]
    model = hf_model(name)
    result = generate(model, fixture_prompts(name), SamplingConfig(n=2, temperature=0, max_new_tokens=8, batch_size=2), progress=False)
    eos = set(model.config.eos_token_ids)
    for i, row in enumerate(want):
        stops = [t for t, tok in enumerate(row) if tok in eos]
        n = stops[0] + 1 if stops else len(row)
        assert result.tokens[i] == [row[:n].tolist()] * 2
        assert result.finished[i].tolist() == [bool(stops)] * 2 and result.num_tokens[i].tolist() == [n] * 2


SAMPLED = SamplingConfig(n=2, temperature=1.0, top_p=0.9, top_k=40, max_new_tokens=6, batch_size=3, seed=3)
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]


def test_same_seed_same_outputs_whatever_the_batching():
    model = hf_model("llama_gqa")
    first = generate(model, PROMPTS, SAMPLED, progress=False)
    assert generate(model, PROMPTS, SAMPLED, progress=False).tokens == first.tokens
    # a subset keeps its results when called with the prompts' global indices (what resuming does);
    # batches are filled longest first, so each of these prompts sits in other rows, beside other
    # prompts, than in the first run (the batch shape stays: no second compilation)
    subset = generate(model, [PROMPTS[3], PROMPTS[1]], SAMPLED, indices=[3, 1], progress=False)
    assert subset.tokens == [first.tokens[3], first.tokens[1]]
    regrouped = generate(model, [PROMPTS[1], PROMPTS[0]], SAMPLED, indices=[1, 0], progress=False)
    assert regrouped.tokens == [first.tokens[1], first.tokens[0]]
    # samples differ from each other and from another seed
    assert any(a != b for a, b in first.tokens)
    other = generate(model, PROMPTS, SamplingConfig(**{**SAMPLED.__dict__, "seed": 4}), progress=False)
    assert other.tokens != first.tokens


def test_sharded_greedy_equals_single_device():
    assert jax.device_count() == 8
    name = "qwen2_tied"
    cfg = SamplingConfig(n=2, temperature=0, max_new_tokens=8, batch_size=2)
    single = generate(hf_model(name), fixture_prompts(name), cfg, progress=False)
    mesh = make_mesh((2, 2, 2))
    sharded_model = shard_model(load_hf_model(HF / name), mesh)
    assert len(sharded_model.embed_tokens.embedding[...].sharding.device_set) == 8
    sharded = generate(sharded_model, fixture_prompts(name), cfg, mesh, progress=False)
    assert sharded.tokens == single.tokens
    np.testing.assert_array_equal(sharded.finished, single.finished)


# -- the stage -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """A random policy over the tiny word-level tokenizer's vocabulary."""
    tok = Tokenizer.from_pretrained(FIXTURES / "data" / "tiny_tokenizer")
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, eos_token_id=tok.eos_id)
    # Random weights drawn with NumPy: an eager init_model compiles every random op (~4 s on CPU).
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state), tok


def write_prompts(path: Path, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        words = " ".join(f"w{(i * 7 + j) % 100}" for j in range(1 + i % 4))
        prompt = words if i % 2 else [{"role": "user", "content": words}]
        rows.append({"id": f"p{i}", "prompt": prompt})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


STAGE_CFG = SamplingConfig(n=2, temperature=1.0, max_new_tokens=5, batch_size=2, seed=1)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def crash_generate_on_second_call(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """sampling.generate raises `error` on its second call: a run killed after its first chunk."""
    real_generate, calls = sampling.generate, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", crashing)


def test_sample_stage_writes_decoded_responses(tiny, tmp_path):
    model, tok = tiny
    rows = write_prompts(tmp_path / "prompts.jsonl", 3)
    assert sample_stage(model, tok, tmp_path / "prompts.jsonl", tmp_path / "out.jsonl", STAGE_CFG, progress=False) == 3
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == ["p0", "p1", "p2"] and [r["prompt"] for r in out] == [r["prompt"] for r in rows]
    # the texts are exactly the sampled tokens (stop token dropped): compare with generate itself
    prompts = [tok.encode(tok.apply_chat_template(r["prompt"], add_generation_prompt=True), add_special_tokens=False)
               if isinstance(r["prompt"], list) else tok.encode(r["prompt"]) for r in rows]
    want = generate(model, prompts, STAGE_CFG, progress=False)
    for rec, seqs, fins in zip(out, want.tokens, want.finished):
        assert rec["responses"] == [tok.decode(s[:-1] if f else s) for s, f in zip(seqs, fins)]
        assert rec["truncated"] == [not f for f in fins]
    assert not (tmp_path / ".out.jsonl.parts").exists()


def test_sample_stage_resumes_without_duplicates(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    write_prompts(tmp_path / "prompts.jsonl", 7)
    run = functools.partial(sample_stage, model, tok, tmp_path / "prompts.jsonl", cfg=STAGE_CFG, chunk_size=3, progress=False)
    run(out_path=tmp_path / "whole.jsonl")

    crash_generate_on_second_call(monkeypatch, KeyboardInterrupt("killed"))
    with pytest.raises(KeyboardInterrupt):
        run(out_path=tmp_path / "resumed.jsonl")
    assert not (tmp_path / "resumed.jsonl").exists()
    assert len(list((tmp_path / ".resumed.jsonl.parts").glob("*.jsonl"))) == 1  # the first chunk, whole
    monkeypatch.undo()

    assert run(out_path=tmp_path / "resumed.jsonl") == 4  # only the prompts not done yet
    assert read_jsonl(tmp_path / "resumed.jsonl") == read_jsonl(tmp_path / "whole.jsonl")
    assert run(out_path=tmp_path / "resumed.jsonl") == 0  # finished: nothing left to do
    assert len(read_jsonl(tmp_path / "resumed.jsonl")) == 7


def test_sample_stage_refuses_to_mix_settings(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    write_prompts(tmp_path / "prompts.jsonl", 4)
    crash_generate_on_second_call(monkeypatch, RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        sample_stage(model, tok, tmp_path / "prompts.jsonl", tmp_path / "out.jsonl", STAGE_CFG, chunk_size=2, progress=False)
    hotter = SamplingConfig(**{**STAGE_CFG.__dict__, "temperature": 2.0})
    with pytest.raises(ResumeError, match=r"temperature: 1.0 -> 2.0"):
        sample_stage(model, tok, tmp_path / "prompts.jsonl", tmp_path / "out.jsonl", hotter, chunk_size=2, progress=False)


def test_duplicate_prompt_ids_are_refused(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "w1"}\n{"id": "a", "prompt": "w2"}\n')
    # Refused while reading, naming both lines (bpo_jax.data.readers), before any sampling.
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'id': duplicate id 'a' \(first at .*p.jsonl:1\)"):
        sample_stage(model, tok, tmp_path / "p.jsonl", tmp_path / "o.jsonl", STAGE_CFG, progress=False)
    assert not (tmp_path / "o.jsonl").exists()


def test_min_new_tokens_excludes_stop_ids_until_reached():
    """With most of the vocabulary stopping, no row ends before min_new_tokens, and rows do end after."""
    model = hf_model("llama_gqa")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    stop = tuple(range(3, 128, 2))  # half the vocabulary
    base = SamplingConfig(n=8, temperature=1.0, max_new_tokens=6, batch_size=3, stop_ids=stop)
    free = generate(model, prompts, base, progress=False)
    held = generate(model, prompts, dataclasses.replace(base, min_new_tokens=3), progress=False)
    assert (free.num_tokens < 3).any()  # without the floor, short responses happen at this stop density
    assert (held.num_tokens >= 3).all() and held.finished.any()
    for responses in held.tokens:
        for seq in responses:
            assert not set(seq[:2]) & set(stop)
    with pytest.raises(SamplingConfigError, match="min_new_tokens"):
        SamplingConfig(max_new_tokens=4, min_new_tokens=5)
