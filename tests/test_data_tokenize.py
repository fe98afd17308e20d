"""Tokenization layout (BOS/EOS, chat templates), TRL truncation and the DPO batch masks, by hand."""

from pathlib import Path

import numpy as np
import pytest

from bpo_jax.data import DataError, PreferencePair, collate_pairs, tokenize_pairs
from bpo_jax.tokenizer import Tokenizer, TokenizerError

FIXTURE = Path(__file__).parent / "fixtures" / "data" / "tiny_tokenizer"
BOS, EOS, PAD, USER, ASSISTANT, END = 1, 2, 0, 5, 6, 7


def w(*ns):
    """Text of words wN and their ids (N + 8) in the fixture tokenizer."""
    return " ".join(f"w{n}" for n in ns), [n + 8 for n in ns]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(FIXTURE)


def _pair(prompt, chosen, rejected, id_="x"):
    return PreferencePair(id_, prompt, chosen, rejected)


def test_hand_built_batch_token_by_token(tok):
    (p, p_ids), (c, c_ids), (r, r_ids) = w(1, 2, 3), w(4, 5), w(6)
    chat = _pair([{"role": "user", "content": "w1"}], [{"role": "assistant", "content": "w2 w3"}], [{"role": "assistant", "content": "w9"}])
    data, report = tokenize_pairs([_pair(p, c, r), chat], tok, max_length=16)
    assert report.n_examples == 2 and report.n_dropped_empty == 0
    batch = collate_pairs(data, np.array([0, 1, -1]), length=10)

    # plain prompt: BOS from the post-processor; responses: no BOS, EOS appended
    assert p_ids == [9, 10, 11] and c_ids == [12, 13] and r_ids == [14]
    # chat prompt "<s><|user|> w1 <|end|>\n<|assistant|> ": one BOS, written by the template
    expected_chosen = [
        [BOS, 9, 10, 11, 12, 13, EOS, PAD, PAD, PAD],
        [BOS, USER, 9, END, ASSISTANT, 10, 11, EOS, PAD, PAD],
        [PAD] * 10,
    ]
    expected_rejected = [
        [BOS, 9, 10, 11, 14, EOS, PAD, PAD, PAD, PAD],
        [BOS, USER, 9, END, ASSISTANT, 17, EOS, PAD, PAD, PAD],
        [PAD] * 10,
    ]
    assert batch["chosen_input_ids"].tolist() == expected_chosen
    assert batch["rejected_input_ids"].tolist() == expected_rejected
    assert batch["chosen_attention_mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 8 + [0] * 2, [0] * 10]
    assert batch["chosen_loss_mask"].tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [0] * 10,
    ]
    assert batch["rejected_attention_mask"].tolist() == [[1] * 6 + [0] * 4, [1] * 7 + [0] * 3, [0] * 10]
    assert batch["rejected_loss_mask"].tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0] * 10,
    ]
    assert batch["valid"].tolist() == [1.0, 1.0, 0.0]
    assert batch["example_index"].tolist() == [0, 1, -1]
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {**{k: np.int32 for k in batch if k != "valid"}, "valid": np.float32}
    assert "ref_chosen_logps" not in batch


def test_multi_turn_response_continues_the_prompt(tok):
    prompt = [{"role": "system", "content": "w0"}, {"role": "user", "content": "w1"}]
    chosen = [{"role": "assistant", "content": "w2"}, {"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4"}]
    data, _ = tokenize_pairs([_pair(prompt, chosen, [{"role": "assistant", "content": "w5"}])], tok, max_length=32)
    assert data.prompt[0].tolist() == [BOS, 4, 8, END, USER, 9, END, ASSISTANT]
    # earlier turns rendered by the template, the final assistant turn is content + EOS
    assert data.chosen[0].tolist() == [10, END, USER, 11, END, ASSISTANT, 12, EOS]
    assert data.rejected[0].tolist() == [13, EOS]
    whole = tok.encode(tok.apply_chat_template(prompt + chosen), add_special_tokens=False)
    assert whole[: len(data.prompt[0]) + len(data.chosen[0]) - 1] == data.prompt[0].tolist() + data.chosen[0].tolist()[:-1]


def _reference_truncation(p, c, r, max_length, max_prompt_length):
    """TRL's rule written out on Python lists, as an independent check."""
    if len(p) + max(len(c), len(r)) > max_length and max_prompt_length is not None:
        p = p[-max_prompt_length:] if len(p) > max_prompt_length else p
    room = max(max_length - len(p), 0)
    return p, c[:room], r[:room]


@pytest.mark.parametrize("max_length, max_prompt_length", [(12, 5), (12, None), (8, 8), (20, 3), (6, 2)])
def test_truncation_matches_reference(tok, max_length, max_prompt_length):
    rng = np.random.default_rng(0)
    pairs, expected = [], []
    for i in range(60):
        lp, lc, lr = rng.integers(1, 14, size=3)
        (p, p_ids), (c, c_ids), (r, r_ids) = (w(*rng.integers(0, 100, size=n)) for n in (lp, lc, lr))
        pairs.append(_pair(p, c, r, str(i)))
        expected.append(_reference_truncation([BOS] + p_ids, c_ids + [EOS], r_ids + [EOS], max_length, max_prompt_length))
    data, report = tokenize_pairs(pairs, tok, max_length, max_prompt_length)
    kept = [i for i, (p, c, r) in enumerate(expected) if c and r]
    assert data.source_index.tolist() == kept and data.ids.tolist() == [str(i) for i in kept]
    for j, i in enumerate(kept):
        assert (data.prompt[j].tolist(), data.chosen[j].tolist(), data.rejected[j].tolist()) == expected[i]
    originals = [(1 + len(p.prompt.split()), 1 + len(p.chosen.split()), 1 + len(p.rejected.split())) for p in pairs]
    assert report.n_dropped_empty == len(pairs) - len(kept)
    assert report.n_prompt_truncated == sum(len(expected[i][0]) < originals[i][0] for i in kept)
    assert report.n_response_truncated == sum(
        (len(expected[i][1]) < originals[i][1]) + (len(expected[i][2]) < originals[i][2]) for i in kept
    )
    assert (data.seq_lengths <= max_length).all()


def test_prompt_longer_than_max_length(tok):
    p, p_ids = w(*range(10))  # 11 tokens with BOS
    (c, c_ids), (r, r_ids) = w(50, 51, 52), w(60)
    data, report = tokenize_pairs([_pair(p, c, r)], tok, max_length=8, max_prompt_length=4)
    assert data.prompt[0].tolist() == p_ids[-4:]  # keeps the END of the prompt (BOS is cut too)
    assert data.chosen[0].tolist() == c_ids + [EOS]  # 4 + 4 = 8 fits
    assert data.rejected[0].tolist() == r_ids + [EOS]  # its own length, not padded or cut to chosen's
    assert (report.n_prompt_truncated, report.n_response_truncated, report.n_dropped_empty) == (1, 0, 0)

    data, report = tokenize_pairs([_pair(p, c, r)], tok, max_length=6, max_prompt_length=4)
    assert data.chosen[0].tolist() == c_ids[:2]  # keeps the START, loses EOS
    assert data.rejected[0].tolist() == r_ids + [EOS]
    assert (report.n_prompt_truncated, report.n_response_truncated) == (1, 1)

    # without a prompt cap an over-long prompt leaves no room for a response: dropped and counted
    data, report = tokenize_pairs([_pair(p, c, r), _pair("w1", c, r)], tok, max_length=8)
    assert len(data) == 1 and data.source_index.tolist() == [1]
    assert (report.n_input, report.n_examples, report.n_dropped_empty) == (2, 1, 1)


def test_response_empty_after_truncation_is_dropped(tok):
    p, _ = w(*range(6))
    data, report = tokenize_pairs([_pair(p, "w1", "w2")], tok, max_length=5, max_prompt_length=5)
    assert len(data) == 0 and report.n_dropped_empty == 1 and report.n_examples == 0


def test_reference_logps_travel_with_examples(tok):
    pairs = [_pair(*(w(i, i + 1)[0] for _ in range(3)), str(i)) for i in range(3)]
    data, _ = tokenize_pairs(pairs, tok, max_length=16)
    with pytest.raises(ValueError, match=r"ref_chosen_logps: expected shape \(3,\)"):
        data.with_ref_logps([1.0, 2.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="ref_rejected_logps: non-finite value at example 1"):
        data.with_ref_logps([1.0, 2.0, 3.0], [0.0, np.nan, 0.0])
    data = data.with_ref_logps([-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0])
    batch = collate_pairs(data, np.array([2, -1, 0]), length=8)
    assert batch["ref_chosen_logps"].tolist() == [-3.0, 0.0, -1.0]
    assert batch["ref_rejected_logps"].tolist() == [-6.0, 0.0, -4.0]
    assert batch["ref_chosen_logps"].dtype == np.float32


def test_chat_template_problems(tok):
    chat = _pair([{"role": "critic", "content": "w1"}], [{"role": "assistant", "content": "w2"}], [{"role": "assistant", "content": "w3"}], "row-7")
    with pytest.raises(DataError, match=r"^pair id=row-7: field 'prompt': .*unknown role critic"):
        tokenize_pairs([chat], tok, max_length=16)
    no_template = Tokenizer.from_tokenizers(tok.backend, bos="<s>", eos="</s>")
    with pytest.raises(TokenizerError, match="chat_template' missing; pair id=row-7"):
        tokenize_pairs([chat], no_template, max_length=16)
    with pytest.raises(ValueError, match="must be >= 1"):
        tokenize_pairs([chat], tok, max_length=0)
