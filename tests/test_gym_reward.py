"""reasoning-gym as a reward: generated prompts, the task's scorer on extracted answers, the score stage.

The expected rewards are worked out here independently of reasoning-gym: the right answer of each
basic_arithmetic question is computed by evaluating its expression with Python, and a partial
answer earns len(right) / len(answer) (the task's documented rule for an answer that contains the
right one). Skipped only when the optional `reasoning-gym` package is not installed.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym", reason="optional asset package reasoning-gym not installed: pip install reasoning-gym (make install does it)")

from bpo_jax.config import load_config  # noqa: E402
from bpo_jax.gym_reward import extract_answer, gym_prompt_records, write_gym_prompts  # noqa: E402
from bpo_jax.rewards import RewardConfig, RewardError, build_scorer, read_groups, score_stage  # noqa: E402

TASK = "basic_arithmetic"
OPTIONS = {"size": 12, "seed": 3, "min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def right_answer(question: str) -> str:
    """'Calculate ( 2 + -8 ) + 4.' -> '-2', evaluated exactly with fractions."""
    expression = question.removeprefix("Calculate ").removesuffix(".")
    tokens = [f"Fraction({t})" if t.lstrip("-").isdigit() else t for t in expression.split()]
    value = eval(" ".join(tokens), {"Fraction": Fraction})  # noqa: S307 (our own generated text)
    assert value.denominator == 1, question
    return str(value.numerator)


@pytest.fixture(scope="module")
def records():
    return gym_prompt_records(TASK, OPTIONS)


@pytest.fixture(scope="module")
def scorer():
    return build_scorer(RewardConfig(kind="gym", gym_task=TASK, gym_config=OPTIONS, batch_size=5))


def test_prompts_are_the_seeded_questions(records):
    assert len(records) == OPTIONS["size"]
    assert [r["id"] for r in records] == [f"{TASK}-{i}" for i in range(OPTIONS["size"])]
    assert all(r["prompt"][0]["content"].startswith("Calculate ") for r in records)
    assert gym_prompt_records(TASK, OPTIONS) == records  # same seed, same questions
    assert gym_prompt_records(TASK, {**OPTIONS, "seed": 4}) != records


def test_right_wrong_and_partial_answers(records, scorer):
    prompts, responses, expected = [], [], []
    for r in records:
        right = right_answer(r["prompt"][0]["content"])
        wrong = str(int(right) + 1)
        chatty = f"The result is {right}."
        cases = {
            f"Let me think.\n<answer>{right}</answer>": 1.0,
            f" {right}\n": 1.0,  # no tags: the whole response, stripped
            f"<answer>{wrong}</answer>": 0.0,
            f"<answer>{wrong}</answer> no, wait: <answer>{right}</answer>": 1.0,  # the last tag counts
            chatty: len(right) / len(chatty),
            "": 0.0,
        }
        for response, reward in cases.items():
            prompts.append(r["prompt"])
            responses.append(response)
            expected.append(reward)
    # Instructions in a system message: the question is still the user message.
    instructed = gym_prompt_records(TASK, OPTIONS, system_prompt="Reply with just the number.")
    assert instructed[0]["prompt"] == [{"role": "system", "content": "Reply with just the number."}, records[0]["prompt"][0]]
    prompts.append(instructed[0]["prompt"])
    responses.append(right_answer(records[0]["prompt"][0]["content"]))
    expected.append(1.0)
    # A plain-text prompt is its own question.
    prompts.append(records[0]["prompt"][0]["content"])
    responses.append(right_answer(records[0]["prompt"][0]["content"]))
    expected.append(1.0)
    assert scorer(prompts, responses).tolist() == pytest.approx(expected, abs=1e-12)


def test_extract_answer():
    assert extract_answer("x <answer> 42 </answer> y") == "42"
    assert extract_answer("<answer>1</answer><answer>2</answer>") == "2"
    assert extract_answer("unclosed <answer>3") == "unclosed <answer>3"
    assert extract_answer("  7 \n") == "7"


def test_score_stage_with_gym_reward(records, scorer, tmp_path):
    responses = tmp_path / "responses.jsonl"
    rows = [
        {"id": r["id"], "prompt": r["prompt"], "responses": [right_answer(r["prompt"][0]["content"]), "no idea"]}
        for r in records[:4]
    ]
    responses.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scored = tmp_path / "scored.jsonl"
    assert score_stage(responses, scored, scorer, progress=False) == 4
    groups = read_groups(scored, with_rewards=True)
    assert [g.rewards for g in groups] == [[1.0, 0.0]] * 4


def test_write_gym_prompts_holds_out_the_last_questions(records, tmp_path):
    train, held_out = write_gym_prompts(TASK, OPTIONS, tmp_path, num_eval=3)
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    assert len({r["prompt"][0]["content"] for r in records}) == len(records)  # no repeats at this size
    assert read(train) == records[:-3] and read(held_out) == records[-3:]
    with pytest.raises(RewardError, match=r"num_eval=12 must be in \[1, 12\) \(the distinct questions\)"):
        write_gym_prompts(TASK, OPTIONS, tmp_path, num_eval=12)


def test_repeated_questions_are_written_once_and_never_held_out_and_trained(tmp_path):
    small = {"size": 60, "seed": 0, "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
             "operators": ["+"], "allow_parentheses": False, "allow_negation": False}  # 10 x 10 sums: repeats
    questions = [r["prompt"][0]["content"] for r in gym_prompt_records(TASK, small)]
    distinct = list(dict.fromkeys(questions))
    assert len(distinct) < len(questions)
    train, held_out = write_gym_prompts(TASK, small, tmp_path, num_eval=10)
    read = lambda p: [json.loads(line)["prompt"][0]["content"] for line in p.read_text().splitlines()]  # noqa: E731
    assert read(train) == distinct[:-10] and read(held_out) == distinct[-10:]


def test_bad_gym_settings_are_named(scorer):
    with pytest.raises(RewardError, match="unknown reasoning-gym task 'no_such_task'"):
        build_scorer(RewardConfig(kind="gym", gym_task="no_such_task"))
    with pytest.raises(RewardError, match=r"reward\.gym_config for 'basic_arithmetic'.*max_termz"):
        build_scorer(RewardConfig(kind="gym", gym_task=TASK, gym_config={"max_termz": 3}))
    with pytest.raises(RewardError, match="gym_task: required"):
        RewardConfig(kind="gym")
    with pytest.raises(RewardError, match="'Calculate 1 \\+ 1\\.' is not one of the task's generated questions"):
        scorer([[{"role": "user", "content": "Calculate 1 + 1."}]], ["2"])


def test_committed_smollm2_prompts_are_what_the_config_generates(tmp_path):
    """configs/smollm2_gym.yaml scores with reward.gym_config: its committed prompt files must be
    exactly what that config writes, or the scorer would not know their questions."""
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "smollm2_gym.yaml", check_files=False)
    committed = [root / config.data.prompts, root / config.data.eval_prompts]
    system = json.loads(committed[0].read_text().splitlines()[0])["prompt"][0]["content"]
    num_eval = len(committed[1].read_text().splitlines())
    written = write_gym_prompts(config.reward.gym_task, config.reward.gym_config, tmp_path, num_eval, system)
    for ours, theirs in zip(written, committed):
        assert ours.read_text() == theirs.read_text(), theirs
