"""The sequence-handling rules of DPO, end to end from text to loss, each against a bug a peer shipped.

Expected values are computed independently of the library's scoring path: log-probs from the
model run on ONE unpadded sequence at a time, with a NumPy log-softmax and an explicit sum over the
response positions, and the loss from the DPO formula written out in NumPy.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax.config import OptimSection, TrainSection
from bpo_jax.data.batching import collate_pairs
from bpo_jax.data.schema import PreferencePair
from bpo_jax.data.tokenize import tokenize_pairs
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import init_model
from bpo_jax.sharding import make_mesh
from bpo_jax.tokenizer import Tokenizer
from bpo_jax.train import DPOTrainer, concatenated_logps

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "data" / "tiny_tokenizer"
BOS, EOS = 1, 2  # the tiny tokenizer's ids; words "w0".."w124" are ids 8..132


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=136, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return init_model(config, seed=3)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def independent_logp(model, prompt: list[int], response: list[int]) -> float:
    """sum_t log p(response[t] | prompt + response[:t]) from one unpadded forward and a NumPy log-softmax."""
    ids = np.array(prompt + response, np.int32)[None]
    logits = np.asarray(model(jnp.asarray(ids)), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(logp[len(prompt) + t - 1, tok_id] for t, tok_id in enumerate(response)))


def test_response_is_scored_with_eos_appended(tok, model):
    """The EOS after a response is a predicted, scored token: the policy must learn where to stop.

    Peer bug: PaddleFormers' DPO dropped the EOS term from the sequence log-prob
    (PaddlePaddle/PaddleFormers#4908); without it the model is never pushed to end its answers.
    """
    pair = PreferencePair("p", words(1, 2), words(3, 4, 5), words(6))
    data, _ = tokenize_pairs([pair], tok, max_length=32)
    assert data.chosen[0].tolist() == [11, 12, 13, EOS] and data.rejected[0].tolist() == [14, EOS]
    batch = collate_pairs(data, np.array([0]), 16)
    n_prompt = len(data.prompt[0])
    assert batch["chosen_loss_mask"][0, n_prompt + 3] == 1  # the EOS position is scored
    (chosen, rejected), _ = concatenated_logps(model, {k: jnp.asarray(v) for k, v in batch.items()})
    prompt = data.prompt[0].tolist()
    expected = independent_logp(model, prompt, [11, 12, 13, EOS])
    np.testing.assert_allclose(float(chosen[0]), expected, rtol=1e-5)
    without_eos = independent_logp(model, prompt, [11, 12, 13])
    assert abs(expected - without_eos) > 1e-3  # the EOS term is really part of the sum
    np.testing.assert_allclose(float(rejected[0]), independent_logp(model, prompt, [14, EOS]), rtol=1e-5)


def test_response_ending_with_eos_text_gets_exactly_one_eos(tok):
    """A response whose text already ends with the EOS token is not given a second one.

    Peer bug: TRL's DPOTrainer appended eos_token to chat-formatted responses that already ended
    with it, training on `...<|im_end|><|im_end|>` (huggingface/trl#4481).
    """
    pair = PreferencePair("p", words(1), words(3) + " </s>", words(4) + " </s> ")
    data, _ = tokenize_pairs([pair], tok, max_length=32)
    assert data.chosen[0].tolist() == [11, EOS]
    assert data.rejected[0].tolist() == [12, EOS]


def test_no_bos_before_the_response(tok):
    """Exactly one BOS per scored sequence, at position 0; never one between prompt and response.

    Peer bug: axolotl's DPO inserted <|begin_of_text|> before the chosen and rejected responses
    of Llama 3 (axolotl-ai-cloud/axolotl#1616), since responses were encoded with special tokens.
    """
    assert tok.adds_bos  # the trap is armed: plain encode() adds a BOS
    text = PreferencePair("a", words(1, 2), words(3), words(4, 5))
    chat = PreferencePair("b", [{"role": "user", "content": words(1)}],
                          [{"role": "assistant", "content": words(3)}], [{"role": "assistant", "content": words(7)}])
    data, _ = tokenize_pairs([text, chat], tok, max_length=32)
    batch = collate_pairs(data, np.arange(2), 16)
    for side in ("chosen", "rejected"):
        ids, attention = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        for row in range(2):
            real = ids[row][attention[row] == 1].tolist()
            assert real[0] == BOS and real.count(BOS) == 1, (side, row, real)
            response = ids[row][batch[f"{side}_loss_mask"][row] == 1].tolist()
            assert response[0] != BOS and response[-1] == EOS


def test_prompt_truncation_keeps_the_end_and_the_responses(tok):
    """An over-long prompt loses its beginning; the question next to the answer and both responses stay.

    Peer bug: TRL 1.x truncates prompt+completion keeping the START (truncation_mode="keep_start"),
    so a long prompt cut the completions away entirely: 7.6% of UltraFeedback pairs at
    max_length=512 trained on no completion token until they were dropped (huggingface/trl#6321,
    #6421).
    """
    prompt_ids = list(range(20, 40))  # 20 words + BOS = 21 tokens
    pair = PreferencePair("p", words(*prompt_ids), words(90, 91, 92), words(93))
    data, report = tokenize_pairs([pair], tok, max_length=12, max_prompt_length=6)
    assert data.prompt[0].tolist() == [i + 8 for i in prompt_ids[-6:]]  # the last 6 prompt tokens
    assert data.chosen[0].tolist() == [98, 99, 100, EOS]
    assert data.rejected[0].tolist() == [101, EOS]
    assert report.n_prompt_truncated == 1 and report.n_response_truncated == 0


def test_chosen_and_rejected_keep_their_own_lengths(tok, model):
    """A long chosen and a short rejected are each cut (or not) on their own and scored over their
    own tokens only; neither is cut to the other's length, and padding never counts.

    Peer bugs: LLaMA-Factory applied the cutoff computed for the chosen response to the pair
    (hiyouga/LlamaFactory#4402); compose-rl truncated chosen and rejected "by the same amount"
    (databricks/compose-rl#27).
    """
    pair = PreferencePair("p", words(1, 2), words(*range(10, 30)), words(50, 51))
    data, report = tokenize_pairs([pair], tok, max_length=12, max_prompt_length=4)
    prompt = data.prompt[0].tolist()
    assert prompt == [BOS, 9, 10]  # fits the cap: uncut
    assert data.chosen[0].tolist() == [i + 8 for i in range(10, 19)]  # 12 - 3 = 9 tokens, no EOS left
    assert data.rejected[0].tolist() == [58, 59, EOS]  # untouched
    assert report.n_response_truncated == 1
    batch = collate_pairs(data, np.array([0]), 16)
    assert batch["chosen_loss_mask"].sum() == 9 and batch["rejected_loss_mask"].sum() == 3
    (chosen, rejected), (chosen_mean, rejected_mean) = concatenated_logps(model, {k: jnp.asarray(v) for k, v in batch.items()})
    expected_chosen = independent_logp(model, prompt, data.chosen[0].tolist())
    expected_rejected = independent_logp(model, prompt, [58, 59, EOS])
    np.testing.assert_allclose([float(chosen[0]), float(rejected[0])], [expected_chosen, expected_rejected], rtol=1e-5)
    np.testing.assert_allclose([float(chosen_mean[0]), float(rejected_mean[0])],
                               [expected_chosen / 9, expected_rejected / 3], rtol=1e-5)


def test_beta_is_applied_exactly_once(tok, model):
    """loss = -log sigmoid(beta * h) and rewards = beta * (policy - reference): beta once, not squared.

    Peer bugs: MaxText's DPO loss multiplied by beta twice (AI-Hypercomputer/maxtext#1530); the
    tinker cookbook logged margins with beta applied twice (thinking-machines-lab/tinker-cookbook#172).
    """
    pairs = [PreferencePair(str(i), words(i, i + 1), words(*range(20 + i, 24 + 2 * i)), words(60 + i, 61))
             for i in range(4)]
    data, _ = tokenize_pairs(pairs, tok, max_length=32)
    ref_c = np.array([-30.0, -25.0, -40.0, -33.0], np.float32)
    ref_r = np.array([-12.0, -15.0, -11.0, -14.0], np.float32)
    data = data.with_ref_logps(ref_c, ref_r)
    batch = collate_pairs(data, np.arange(4), 16)
    pc = np.array([independent_logp(model, data.prompt[i].tolist(), data.chosen[i].tolist()) for i in range(4)])
    pr = np.array([independent_logp(model, data.prompt[i].tolist(), data.rejected[i].tolist()) for i in range(4)])
    h = (pc - ref_c) - (pr - ref_r)
    assert np.ptp(h) > 1.0  # distinct margins, so beta^2 or 1 would give visibly different losses
    for beta in (0.1, 0.5):
        cfg = TrainSection(beta=beta, reference="precomputed", batch_size=4,
                           optim=OptimSection(learning_rate=1e-3, schedule="constant"))
        trainer = DPOTrainer(model=_copy(model), config=cfg, mesh=make_mesh((1, 1, 1), jax.devices()[:1]), total_steps=1)
        _, metrics = trainer.train_step(trainer.init_state(), batch)
        expected_loss = np.mean(np.logaddexp(0.0, -beta * h))  # -log sigmoid(beta h)
        np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["rewards/chosen"]), np.mean(beta * (pc - ref_c)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(metrics["rewards/margins"]), np.mean(beta * h), rtol=1e-5, atol=1e-6)


def _copy(model):
    """A fresh model with the same weights (the trainer takes ownership of the one it gets)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
