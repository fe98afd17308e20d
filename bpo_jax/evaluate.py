"""Evaluation: held-out preference accuracy and reward of the trained policy vs its reference.

Two views of "did DPO help":
- preference accuracy on held-out pairs: how often the policy's implicit reward
  beta * (log pi(y|x) - log ref(y|x)) ranks chosen above rejected, and, as a baseline both
  models share, how often each model's own log-likelihood does;
- generation quality: mean reward of the policy's and the reference's responses to held-out
  prompts under the run's reward, and the policy's win rate (ties count one half).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.data.tokenize import TokenizedPairs
from bpo_jax.io_utils import pyplot, save_figure
from bpo_jax.models.llama import CausalLM
from bpo_jax.train import precompute_reference_logps


def pair_logps(model: CausalLM, data: TokenizedPairs, mesh: Mesh, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs (chosen, rejected) of every example, in dataset order."""
    batches = PreferenceBatcher(data, batch_size, shuffle=False).epoch_batches()
    index, chosen, rejected = precompute_reference_logps(model, batches, mesh)
    order = np.argsort(index)
    return chosen[order], rejected[order]


def preference_accuracy(
    policy: CausalLM, reference: CausalLM, data: TokenizedPairs, mesh: Mesh, *, batch_size: int = 16
) -> dict[str, float]:
    """Implicit-reward accuracy of the policy, and log-likelihood accuracy of both models."""
    pc, pr = pair_logps(policy, data, mesh, batch_size)
    rc, rr = pair_logps(reference, data, mesh, batch_size)
    margin = (pc - rc) - (pr - rr)
    return {
        "implicit_reward_accuracy": float(np.mean(margin > 0)),
        "policy_logp_accuracy": float(np.mean(pc > pr)),
        "reference_logp_accuracy": float(np.mean(rc > rr)),
        "n_pairs": int(len(data)),
    }


def compare_rewards(policy_rewards: np.ndarray, reference_rewards: np.ndarray) -> dict[str, float]:
    """Mean rewards and the policy's win rate over paired responses (same prompt, same sample slot)."""
    p = np.asarray(policy_rewards, np.float64)
    r = np.asarray(reference_rewards, np.float64)
    if p.shape != r.shape or p.size == 0:
        raise ValueError(f"reward arrays must be non-empty and equal in shape; got {p.shape} and {r.shape}")
    return {
        "policy_mean_reward": float(p.mean()),
        "reference_mean_reward": float(r.mean()),
        "win_rate": float(np.mean((p > r) + 0.5 * (p == r))),
        "n_responses": int(p.size),
    }


def format_table(results: dict) -> str:
    """The final policy-vs-reference table printed at the end of a run."""
    rows = [("", "policy", "reference")]
    if "policy_mean_reward" in results:
        rows.append(("mean reward", f"{results['policy_mean_reward']:.4f}", f"{results['reference_mean_reward']:.4f}"))
        rows.append(("win rate vs reference", f"{results['win_rate']:.3f}", "0.500"))
    if "policy_logp_accuracy" in results:
        rows.append(
            ("preference accuracy (log-lik)", f"{results['policy_logp_accuracy']:.3f}", f"{results['reference_logp_accuracy']:.3f}")
        )
        rows.append(("preference accuracy (implicit reward)", f"{results['implicit_reward_accuracy']:.3f}", "-"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, width)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(lines)


def plot_reward_comparison(policy_rewards: np.ndarray, reference_rewards: np.ndarray, path: str | Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    bins = np.linspace(min(np.min(policy_rewards), np.min(reference_rewards)), max(np.max(policy_rewards), np.max(reference_rewards)) + 1e-9, 21)
    ax.hist(reference_rewards, bins=bins, alpha=0.6, label=f"reference (mean {np.mean(reference_rewards):.3f})")
    ax.hist(policy_rewards, bins=bins, alpha=0.6, label=f"policy (mean {np.mean(policy_rewards):.3f})")
    ax.set_xlabel("reward on held-out prompts")
    ax.set_ylabel("responses")
    ax.legend()
    save_figure(fig, path)
