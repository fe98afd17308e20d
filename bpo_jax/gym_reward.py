"""reasoning-gym tasks as verifiable rewards: generated prompts, scored by the task's own checker.

A task is a name plus options (`reward.gym_task`, `reward.gym_config` in the YAML), exactly the
arguments of `reasoning_gym.create_dataset(name, **options)`; `size` and `seed` fix the questions.
One generated dataset serves both sides:

- prompts: `write_gym_prompts` writes its questions as chat prompts, the last `num_eval` held out
  (`python -m bpo_jax.gym_reward TASK OUT_DIR --config '{"size": 200, "seed": 1}' --eval 40 [--system TEXT]`);
- reward: the scorer regenerates the same dataset, finds each prompt's entry by its question (the
  last user message, or the whole prompt when it is plain text) and returns
  `dataset.score_answer(answer, entry)` in [0, 1], where the answer is the text inside the last
  <answer>...</answer> of the response, or the whole response (stripped) when it has none.
  Scorers grade partial answers for many tasks (basic_arithmetic: the right number inside a
  longer answer earns len(right) / len(answer)), which gives sweet-spot pairs a spread to use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from bpo_jax.data.schema import Text
from bpo_jax.io_utils import write_jsonl
from bpo_jax.rewards import RewardError, RewardScorer

INSTALL_HINT = "pip install reasoning-gym (or: pip install 'bpo-jax[assets]')"


def create_gym_dataset(task: str, options: dict[str, Any]) -> Any:
    """`reasoning_gym.create_dataset(task, **options)` with errors that name the config keys."""
    try:
        import reasoning_gym
    except ImportError:
        raise RewardError(f"reward.gym_task {task!r}: reasoning-gym is not installed; {INSTALL_HINT}") from None
    try:
        return reasoning_gym.create_dataset(task, **options)
    except ValueError as e:
        if "not registered" in str(e):
            raise RewardError(f"reward.gym_task: unknown reasoning-gym task {task!r}") from None
        raise RewardError(f"reward.gym_config for {task!r}: {e}") from None
    except TypeError as e:  # an option the task's config dataclass does not have
        raise RewardError(f"reward.gym_config for {task!r}: {e}") from None


def extract_answer(response: str) -> str:
    """The text of the last <answer>...</answer>, else the whole response, stripped."""
    start = response.rfind("<answer>")
    if start >= 0:
        end = response.find("</answer>", start)
        if end >= 0:
            return response[start + len("<answer>") : end].strip()
    return response.strip()


def question_of(prompt: Text) -> str:
    """The question a prompt asks: its last user message, or the plain-text prompt itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise RewardError("reward gym: a conversational prompt has no user message to read the question from")
    return users[-1]


def gym_prompt_records(task: str, options: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """{id, prompt} records, one chat prompt per generated question (after `system_prompt`, if
    given: instructions go there, so the user message stays the question the scorer looks up)."""
    dataset = create_gym_dataset(task, options)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        {"id": f"{task}-{i}", "prompt": system + [{"role": "user", "content": e["question"]}]} for i, e in enumerate(dataset)
    ]


def write_gym_prompts(
    task: str, options: dict[str, Any], out_dir: str | Path, num_eval: int, system_prompt: str | None = None
) -> tuple[Path, Path]:
    """prompts.jsonl and eval_prompts.jsonl (the last num_eval questions), each question once.

    Small task settings repeat questions; a repeat is dropped so that no held-out question is
    also a training question.
    """
    records, seen = [], set()
    for record in gym_prompt_records(task, options, system_prompt):
        question = question_of(record["prompt"])
        if question not in seen:
            seen.add(question)
            records.append(record)
    if not 0 < num_eval < len(records):
        raise RewardError(f"gym prompts: num_eval={num_eval} must be in [1, {len(records)}) (the distinct questions)")
    out_dir = Path(out_dir)
    train, held_out = out_dir / "prompts.jsonl", out_dir / "eval_prompts.jsonl"
    write_jsonl(train, records[:-num_eval])
    write_jsonl(held_out, records[-num_eval:])
    return train, held_out


def gym_scorer(task: str, options: dict[str, Any] | None, batch_size: int) -> RewardScorer:
    """A RewardScorer grading responses with the task's own `score_answer`."""
    options = dict(options or {})
    dataset = create_gym_dataset(task, options)
    entries: dict[str, dict] = {}
    for entry in dataset:
        entries.setdefault(entry["question"], entry)
    described = f"{task} {json.dumps(options, sort_keys=True)}"

    def fn(prompts: list[Text], responses: list[Text]) -> list[float]:
        scores = []
        for prompt, response in zip(prompts, responses):
            question = question_of(prompt)
            entry = entries.get(question)
            if entry is None:
                raise RewardError(
                    f"reward gym {described}: prompt {question[:80]!r} is not one of the task's generated "
                    "questions (were the prompts written with the same reward.gym_config?)"
                )
            text = response if isinstance(response, str) else response[-1]["content"]
            scores.append(float(dataset.score_answer(extract_answer(text), entry)))
        return scores

    return RewardScorer(f"gym {described}", fn, batch_size)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a reasoning-gym task's prompts (train + held out) as JSONL.")
    parser.add_argument("task", help="reasoning-gym task name, e.g. basic_arithmetic")
    parser.add_argument("out_dir", help="directory for prompts.jsonl and eval_prompts.jsonl")
    parser.add_argument("--config", default="{}", help='task options as JSON, e.g. \'{"size": 200, "seed": 1}\'')
    parser.add_argument("--eval", type=int, required=True, help="held-out questions (the dataset's last ones)")
    parser.add_argument("--system", default=None, help="a system message put before every question")
    args = parser.parse_args(argv)
    train, held_out = write_gym_prompts(args.task, json.loads(args.config), args.out_dir, args.eval, args.system)
    print(f"wrote {train} and {held_out}")


if __name__ == "__main__":
    main()
