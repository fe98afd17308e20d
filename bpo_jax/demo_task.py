"""The embedded demo task: sort a short list of digits, with a graded programmatic reward.

Prompt "sort 3 1 4 1 5 =", ideal response "1 1 3 4 5". The reward is the fraction of positions
that hold the right digit (extra or missing digits count as wrong), so responses are graded,
not just right/wrong: exactly what reward-distribution pair construction needs. SFT
demonstrations are deliberately imperfect (adjacent digits swapped at random), so the SFT policy
leaves room that DPO on its own samples can close.

`python -m bpo_jax.demo_task OUT_DIR` writes the shipped assets (tokenizer, prompts, held-out
prompts, demonstrations) deterministically; bpo_jax/assets/demo_sort/ holds the committed copy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from bpo_jax.io_utils import atomic_open, write_json, write_jsonl

ASSETS = Path(__file__).resolve().parent / "assets" / "demo_sort"  # the committed copy of write_assets
SPECIAL = ("<pad>", "<bos>", "<eos>")
WORDS = SPECIAL + ("sort", "=") + tuple(str(d) for d in range(10))
MIN_LEN, MAX_LEN = 4, 7


def parse_digits(text: str) -> list[int] | None:
    """The digits of a response, or None if it contains anything else."""
    out = []
    for tok in text.split():
        if len(tok) != 1 or not tok.isdigit():
            return None
        out.append(int(tok))
    return out


def prompt_digits(prompt: str) -> list[int]:
    words = prompt.split()
    if len(words) < 3 or words[0] != "sort" or words[-1] != "=":
        raise ValueError(f"not a sort prompt: {prompt!r}")
    return [int(w) for w in words[1:-1]]


def sort_score(prompt: str, response: str) -> float:
    """Fraction of positions right: matches with sorted(x), over max(len(target), len(response))."""
    target = sorted(prompt_digits(prompt))
    got = parse_digits(response)
    if not got:
        return 0.0
    hits = sum(a == b for a, b in zip(target, got))
    return hits / max(len(target), len(got))


def sort_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """Rule reward for the `score` stage (`reward.function: bpo_jax.demo_task:sort_reward`)."""
    return [sort_score(p, r) for p, r in zip(prompts, responses)]


def make_prompts(n: int, seed: int, min_len: int = MIN_LEN, max_len: int = MAX_LEN) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n)
    return [rng.integers(0, 10, size=int(k)).tolist() for k in lengths]


def format_prompt(digits: Sequence[int]) -> str:
    return "sort " + " ".join(map(str, digits)) + " ="


def noisy_sort(digits: Sequence[int], rng: np.random.Generator, swap_prob: float) -> list[int]:
    """sorted(digits) with each adjacent pair swapped with probability `swap_prob` (left to right)."""
    out = sorted(digits)
    for i in range(len(out) - 1):
        if rng.random() < swap_prob:
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def build_tokenizer():
    """A word-level tokenizer over the task vocabulary, adding BOS like Llama's post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.add_special_tokens(list(SPECIAL))
    return tok


def write_assets(
    out_dir: str | Path,
    *,
    n_train: int = 384,
    n_eval: int = 96,
    n_sft: int = 512,
    swap_prob: float = 0.35,
    min_len: int = MIN_LEN,
    max_len: int = MAX_LEN,
) -> None:
    """Write tokenizer + prompts.jsonl + eval_prompts.jsonl + sft.jsonl + eval_pairs.jsonl (disjoint seeds)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    with atomic_open(out / "tokenizer.json") as f:
        f.write(tok.to_str())
    write_json(
        out / "tokenizer_config.json",
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "model_max_length": 64},
    )
    write_jsonl(out / "prompts.jsonl", ({"id": f"train-{i}", "prompt": format_prompt(d)} for i, d in enumerate(make_prompts(n_train, 1, min_len, max_len))))
    write_jsonl(out / "eval_prompts.jsonl", ({"id": f"eval-{i}", "prompt": format_prompt(d)} for i, d in enumerate(make_prompts(n_eval, 2, min_len, max_len))))
    rng = np.random.default_rng(3)
    demos = (
        {"id": f"sft-{i}", "prompt": format_prompt(d), "response": " ".join(map(str, noisy_sort(d, rng, swap_prob)))}
        for i, d in enumerate(make_prompts(n_sft, 4, min_len, max_len))
    )
    write_jsonl(out / "sft.jsonl", demos)
    # Held-out preference pairs on the eval prompts: the correct sort over a noisy one.
    rng = np.random.default_rng(5)
    pairs = []
    for i, d in enumerate(make_prompts(n_eval, 2, min_len, max_len)):
        wrong = noisy_sort(d, rng, 0.5)
        if wrong != sorted(d):
            pairs.append({"id": f"eval-{i}", "prompt": format_prompt(d), "chosen": " ".join(map(str, sorted(d))), "rejected": " ".join(map(str, wrong))})
    write_jsonl(out / "eval_pairs.jsonl", pairs)


# The studies' harder variant (bpo_jax/assets/study_sort/): longer lists leave the SFT policy more
# headroom and a wider reward spread; 512 held-out prompts let confidence intervals separate arms.
STUDY_PRESET = {"n_train": 256, "n_eval": 512, "n_sft": 512, "min_len": 5, "max_len": 9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--study", action="store_true", help="the studies' harder variant (STUDY_PRESET)")
    args = parser.parse_args()
    write_assets(args.out_dir, **(STUDY_PRESET if args.study else {}))


if __name__ == "__main__":
    main()
