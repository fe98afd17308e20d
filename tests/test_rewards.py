"""Reward scoring: the reward-model head against transformers, what the reward model is fed, rule
rewards given as "module:function", precomputed rewards, the resumable score stage, and errors."""

from __future__ import annotations

import functools
import json
import shutil
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bpo_jax.data.schema import DataError
from bpo_jax.models.hf import load_hf_model
from bpo_jax.resumable import ResumeError
from bpo_jax.rewards import (
    RewardConfig,
    RewardError,
    RewardScorer,
    build_scorer,
    load_rule,
    reward_model_inputs,
    rule_scorer,
    score_stage,
    score_tokens,
)
from bpo_jax.sharding import make_mesh, param_sharding
from bpo_jax.tokenizer import Tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REWARD = FIXTURES / "hf" / "llama_reward"
TOKENIZER = FIXTURES / "data" / "tiny_tokenizer"
RULES = "bpo_test_rules"  # the rule module written by the `rules` fixture


@functools.cache
def reward_model():
    return load_hf_model(REWARD)


@functools.cache
def reference() -> dict[str, np.ndarray]:
    with np.load(REWARD / "reference.npz") as f:
        return dict(f)


def fixture_sequences() -> list[list[int]]:
    ref = reference()
    return [row[m.astype(bool)].tolist() for row, m in zip(ref["right_input_ids"], ref["right_attention_mask"])]


@functools.partial(jax.jit, static_argnums=0)
def _rewards(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state).rewards(ids, mask)[:, 0]


def score_left_padded(model, seqs: list[list[int]], length: int = 16) -> np.ndarray:
    """A second path: all sequences in one left-padded batch, unsorted, no filler rows, no mesh
    (score_tokens pads on the right, sorts by length and pads the batch)."""
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):], mask[i, length - len(s):] = s, 1
    return np.asarray(_rewards(*nnx.split(model), ids, mask))


# -- the reward model ------------------------------------------------------------------------------
def test_score_tokens_matches_transformers():
    """Batches of 3 (the last one padded with a filler row), length-sorted, bucket-padded."""
    scores = score_tokens(reward_model(), fixture_sequences(), batch_size=3)
    assert scores.shape == (4,)
    np.testing.assert_allclose(scores, reference()["scores"][:, 0], atol=1e-4, rtol=0)


def test_score_tokens_on_a_mesh_matches_transformers():
    assert jax.device_count() == 8
    mesh = make_mesh((2, 2, 2))
    model = load_hf_model(REWARD, shardings=param_sharding(mesh))
    kernel = model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.sharding.shard_shape(kernel.shape) != kernel.shape  # really split
    scores = score_tokens(model, fixture_sequences(), batch_size=3, mesh=mesh)  # 4 rows per batch
    np.testing.assert_allclose(scores, reference()["scores"][:, 0], atol=1e-4, rtol=0)


def test_score_tokens_keeps_the_end_of_long_inputs():
    seqs = fixture_sequences()
    got = score_tokens(reward_model(), seqs, batch_size=3, max_length=5)  # the compiled shape above
    want = score_left_padded(reward_model(), [s[-5:] for s in seqs])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert not np.allclose(got, reference()["scores"][:, 0], atol=1e-3)  # the cut changed the scores


def test_a_causal_lm_is_not_a_reward_model():
    with pytest.raises(RewardError, match=r"LlamaForCausalLM with num_labels=0; a scalar reward needs a \*ForSequenceClassification"):
        score_tokens(load_hf_model(FIXTURES / "hf" / "llama_gqa"), [[3, 4]], batch_size=1)


def test_reward_model_inputs_by_hand():
    """Plain text: prompt + response encoded with BOS; chat: the template over prompt + response
    messages, no extra specials. Ids from the tiny tokenizer's table: wN = N + 8, <s> = 1,
    <|user|> = 5, <|assistant|> = 6, <|end|> = 7."""
    tok = Tokenizer.from_pretrained(TOKENIZER)
    chat = [{"role": "user", "content": "w1 w2"}]
    seqs = reward_model_inputs(
        ["w1 w2", chat, chat],
        [" w3", "w3", [{"role": "assistant", "content": "w4 w5"}]],
        tok,
    )
    assert [seqs[i].tolist() for i in range(3)] == [
        [1, 9, 10, 11],
        [1, 5, 9, 10, 7, 6, 11, 7],
        [1, 5, 9, 10, 7, 6, 12, 13, 7],
    ]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    """The reward fixture with the tiny tokenizer beside it, as a user's reward-model directory."""
    d = tmp_path_factory.mktemp("rm") / "reward"
    shutil.copytree(REWARD, d)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, d / f.name)
    return d


def test_model_scorer_from_config_scores_each_text_like_the_model(reward_dir):
    scorer = build_scorer(RewardConfig(kind="model", model_path=str(reward_dir), batch_size=3))
    chat = [{"role": "user", "content": "w1 w2"}]
    prompts = ["w1 w2", chat, "w7", chat, "w9 w10 w11"]
    responses = [" w3", "w3", " w8 w9 w10 w11 w12", [{"role": "assistant", "content": "w4 w5"}], " w0"]
    got = scorer(prompts, responses)
    tok = Tokenizer.from_pretrained(reward_dir)
    seqs = reward_model_inputs(prompts, responses, tok)
    want = score_left_padded(reward_model(), [seqs[i].tolist() for i in range(len(seqs))])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert len(set(np.round(got, 4))) == 5  # distinct inputs, distinct scores: nothing got mixed up


# -- rule rewards ----------------------------------------------------------------------------------
RULE_SOURCE = textwrap.dedent(
    """
    CALLS = []

    def word_count(prompts, responses):
        '''Words in the response, minus 0.5 when the prompt is a conversation.'''
        CALLS.append(len(responses))
        return [len(r.split()) - (0.5 if isinstance(p, list) else 0.0) for p, r in zip(prompts, responses)]

    class Judge:
        @staticmethod
        def score(prompts, responses):
            return [float(r == "w1") for r in responses]

    def nan_second(prompts, responses):
        return [float("nan") if i == 1 else 0.0 for i in range(len(responses))]

    def one_value(prompts, responses):
        return [1.0]

    def words(prompts, responses):
        return ["good"] * len(responses)

    def boom(prompts, responses):
        raise KeyError("no reference answer")

    NOT_A_FUNCTION = 3
    """
)


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    d = tmp_path_factory.mktemp("rules")
    (d / f"{RULES}.py").write_text(RULE_SOURCE)
    sys.path.insert(0, str(d))
    try:
        yield __import__(RULES)
    finally:
        sys.path.remove(str(d))
        sys.modules.pop(RULES, None)


def test_rule_reward_by_module_and_function(rules):
    rules.CALLS.clear()
    scorer = build_scorer(RewardConfig(kind="rule", rule=f"{RULES}:word_count", batch_size=2))
    chat = [{"role": "user", "content": "q"}]
    got = scorer(["q", chat, "q", "q", chat], ["a b", "a", "a b c", "x", [{"role": "assistant", "content": "y z"}]])
    np.testing.assert_array_equal(got, [2.0, 0.5, 3.0, 1.0, 1.5])  # the last: its assistant text "y z"
    assert rules.CALLS == [2, 2, 1]  # batches of batch_size
    assert load_rule(f"{RULES}:Judge.score")(["p"], ["w1"]) == [1.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", r"rule reward 'no_colon': expected 'module:function'"),
        (":word_count", r"expected 'module:function'"),
        ("bpo_no_such_module:f", r"cannot import module 'bpo_no_such_module' \(ModuleNotFoundError"),
        (f"{RULES}:missing", rf"module '{RULES}' has no attribute 'missing'"),
        (f"{RULES}:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
    ],
)
def test_rule_spec_errors(rules, spec, message):
    with pytest.raises(RewardError, match=message):
        rule_scorer(spec, batch_size=4)


@pytest.mark.parametrize(
    "function, message",
    [
        ("nan_second", r"reward rule bpo_test_rules:nan_second: non-finite reward nan for id=b responses\[0\]"),
        ("one_value", r"returned shape \(1,\) for 2 responses"),
        ("words", r"returned values that are not numbers"),
        ("boom", r"rule reward bpo_test_rules:boom: raised KeyError: 'no reference answer'"),
    ],
)
def test_bad_rule_values_name_the_rule_and_record(rules, tmp_path, function, message):
    groups = [{"id": "a", "prompt": "q", "responses": ["x"]}, {"id": "b", "prompt": "q", "responses": ["y", "z"]}]
    path = write_jsonl(tmp_path / "responses.jsonl", groups)
    scorer = rule_scorer(f"{RULES}:{function}", batch_size=2)  # batches: [a0, b0], [b1]
    with pytest.raises(RewardError, match=message):
        score_stage(path, tmp_path / "scored.jsonl", scorer, progress=False)
    assert not (tmp_path / "scored.jsonl").exists()


# -- the score stage -------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sampled_groups(n: int) -> list[dict]:
    """What the sample stage writes: {id, prompt, responses, truncated}."""
    rows = []
    for i in range(n):
        prompt = f"w{i}" if i % 3 else [{"role": "user", "content": f"w{i}"}]
        responses = [" ".join(["w1"] * (1 + (i + j) % 4)) for j in range(3)]
        rows.append({"id": f"p{i}", "prompt": prompt, "responses": responses, "truncated": [j == 2 for j in range(3)]})
    return rows


def test_score_stage_with_a_rule(rules, tmp_path):
    rows = sampled_groups(5)
    path = write_jsonl(tmp_path / "responses.jsonl", rows)
    scorer = rule_scorer(f"{RULES}:word_count", batch_size=4)
    assert score_stage(path, tmp_path / "scored.jsonl", scorer, chunk_size=2, progress=False) == 5
    out = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    for rec, row in zip(out, rows):
        chat = isinstance(row["prompt"], list)
        assert rec["rewards"] == [len(r.split()) - 0.5 * chat for r in row["responses"]]
        assert rec["truncated"] == row["truncated"] and rec["prompt"] == row["prompt"]
        texts = [r[-1]["content"] for r in rec["responses"]] if chat else rec["responses"]
        assert texts == row["responses"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["responses.jsonl", "scored.jsonl"]


def test_score_stage_resumes_without_duplicating_or_losing_groups(rules, tmp_path):
    path = write_jsonl(tmp_path / "responses.jsonl", sampled_groups(7))
    scorer = rule_scorer(f"{RULES}:word_count", batch_size=3)
    score_stage(path, tmp_path / "whole.jsonl", scorer, chunk_size=3, progress=False)

    calls = []

    def dies_in_second_chunk(prompts, responses):
        calls.append(len(responses))
        if len(calls) == 4:  # chunk 1 = 9 responses = 3 calls; the 4th call is in chunk 2
            raise KeyboardInterrupt("killed")
        return scorer.fn(prompts, responses)

    crashing = RewardScorer(scorer.name, dies_in_second_chunk, scorer.batch_size)
    with pytest.raises(KeyboardInterrupt):
        score_stage(path, tmp_path / "resumed.jsonl", crashing, chunk_size=3, progress=False)
    assert not (tmp_path / "resumed.jsonl").exists()
    assert len(list((tmp_path / ".resumed.jsonl.parts").glob("*.jsonl"))) == 1  # chunk 1, whole

    assert score_stage(path, tmp_path / "resumed.jsonl", scorer, chunk_size=3, progress=False) == 4
    assert read_jsonl(tmp_path / "resumed.jsonl") == read_jsonl(tmp_path / "whole.jsonl")
    assert score_stage(path, tmp_path / "resumed.jsonl", scorer, chunk_size=3, progress=False) == 0
    assert len(read_jsonl(tmp_path / "resumed.jsonl")) == 7


def test_score_stage_refuses_to_resume_with_another_scorer(rules, tmp_path):
    path = write_jsonl(tmp_path / "responses.jsonl", sampled_groups(4))
    first = rule_scorer(f"{RULES}:word_count", batch_size=8)

    def dies_on_prompt_w2(prompts, responses):  # the second chunk starts with prompt "w2"
        if prompts[0] == "w2":
            raise RuntimeError("killed")
        return first.fn(prompts, responses)

    dying = RewardScorer(first.name, dies_on_prompt_w2, None)
    with pytest.raises(RuntimeError):
        score_stage(path, tmp_path / "scored.jsonl", dying, chunk_size=2, progress=False)
    other = rule_scorer(f"{RULES}:Judge.score", batch_size=8)
    with pytest.raises(ResumeError, match=r"scorer: 'rule bpo_test_rules:word_count' -> 'rule bpo_test_rules:Judge.score'"):
        score_stage(path, tmp_path / "scored.jsonl", other, chunk_size=2, progress=False)


def test_precomputed_rewards_pass_through(tmp_path):
    rows = [dict(r, rewards=[0.5 * i, -1.0, 2.0]) for i, r in enumerate(sampled_groups(3))]
    path = write_jsonl(tmp_path / "scored_in.jsonl", rows)
    assert build_scorer(RewardConfig(kind="precomputed")) is None
    assert score_stage(path, tmp_path / "scored.jsonl", None, progress=False) == 3
    out = read_jsonl(tmp_path / "scored.jsonl")
    assert [r["rewards"] for r in out] == [r["rewards"] for r in rows]
    assert [r["truncated"] for r in out] == [r["truncated"] for r in rows]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rewards": [1.0, float("nan"), 0.0]}, r"responses.jsonl:2: field 'rewards\[1\]': reward is nan"),
        ({"rewards": [1.0]}, r"responses.jsonl:2: field 'rewards'"),
        ({}, r"responses.jsonl:2: field 'rewards': missing"),
    ],
)
def test_precomputed_rewards_are_validated(tmp_path, bad, message):
    rows = [dict(r, rewards=[0.0, 1.0, 2.0]) for r in sampled_groups(2)]
    rows[1] = {k: v for k, v in rows[1].items() if k != "rewards"} | bad
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
    with pytest.raises(DataError, match=message):
        score_stage(tmp_path / "responses.jsonl", tmp_path / "scored.jsonl", None, progress=False)
    assert not (tmp_path / "scored.jsonl").exists()


def test_score_stage_input_errors(rules, tmp_path):
    scorer = rule_scorer(f"{RULES}:word_count", batch_size=8)
    path = write_jsonl(tmp_path / "dup.jsonl", [sampled_groups(1)[0]] * 2)
    with pytest.raises(DataError, match=r"dup.jsonl:2: field 'id': duplicate id 'p0' \(first at .*dup.jsonl:1\)"):
        score_stage(path, tmp_path / "out.jsonl", scorer, progress=False)
    path = write_jsonl(tmp_path / "empty.jsonl", [{"id": "a", "prompt": "q", "responses": ["x", ""]}])
    with pytest.raises(DataError, match=r"empty.jsonl:1: field 'responses\[1\]': empty"):
        score_stage(path, tmp_path / "out.jsonl", scorer, progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "llm-judge"}, r"rewards.kind: 'llm-judge' is not one of"),
        ({"kind": "model"}, r"rewards.model_path: required"),
        ({"kind": "rule"}, r"rewards.rule: required"),
        ({"kind": "rule", "rule": "m:f", "batch_size": 0}, r"rewards.batch_size: must be >= 1"),
    ],
)
def test_reward_config_errors_name_the_field(kwargs, message):
    with pytest.raises(RewardError, match=message):
        RewardConfig(**kwargs)
