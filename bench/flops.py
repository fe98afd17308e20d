"""Model FLOPs of a DPO train step, counted from the architecture: the numerator of every MFU figure.

Why one place: bench_dpo (full and LoRA steps, reference forward included) and bench_mfu (reference
log-probs precomputed) must count alike. Conventions (PaLM's MFU, as in `ModelConfig.flops_per_token`):
a matmul with a [in, out] weight costs 2 x in x out FLOPs per token forward; its backward costs as
much again for the gradient of its input and again for the gradient of its weight. N = the matmul
weights (attention and MLP projections of every layer, plus the LM head, tied or not; norms and the
embedding lookup are not matmuls). Causal attention (QK^T and PV) costs 2 x 2 x layers x seq_len x
heads x head_dim / 2 per token forward (half the square on average), and twice that backward (both
operands are activations, so it does not shrink when the weights are frozen).

Full fine-tuning: policy forward + backward = 6 N + 3 A per token, A the attention forward.
LoRA: policy forward 2 N + A, backward through activations only 2 N + 2 A, and the adapters
(forward 2 x r x (in + out) per target, backward 4 x that: input and weight gradients) = 6 L with L
the adapter parameter count. The reference forward (frozen copy, or the model with adapters off,
adapters skipped) adds 2 N + A per token, unless reference log-probs are precomputed.
"""

from __future__ import annotations

import math
from typing import Any


def matmul_params(config: Any) -> int:
    """N: weights that multiply activations, per token (LM head included, embedding lookup not)."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return config.num_hidden_layers * per_layer + config.vocab_size * h


def attention_forward_flops(config: Any, seq_len: int) -> float:
    """A: causal QK^T and PV FLOPs per token of one forward pass at this sequence length."""
    return 2 * 2 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim / 2


def dpo_step_flops(config: Any, tokens: int, seq_len: int, *, lora_params: int = 0,
                   reference_forward: bool = True) -> float:
    """Model FLOPs of one DPO step over `tokens` tokens (chosen + rejected) of length `seq_len`.

    `lora_params` > 0: a LoRA step with that many adapter parameters (base weights frozen);
    `reference_forward`: the step runs the reference model's forward (else log-probs precomputed)."""
    n, a = matmul_params(config), attention_forward_flops(config, seq_len)
    forward = 2 * n + a
    if lora_params:
        policy = forward + (2 * n + 2 * a) + 6 * lora_params
    else:
        policy = 3 * forward
    return tokens * (policy + (forward if reference_forward else 0))


def step_matmuls(config: Any, rows: int, seq_len: int) -> list[tuple[str, int, str, tuple, tuple]]:
    """The matmuls of a full fine-tuning step with precomputed reference log-probs, at their shapes.

    Why: timing each alone bounds the step from below (no elementwise work, no idle core), so
    model FLOPs / that time is the MFU this device's matmuls allow at this model's shapes; a bar
    above it cannot be met by the step. Each entry is (name, count per step, einsum spec, lhs shape,
    rhs shape) for `rows` sequences of `seq_len` tokens. Per projection: the forward x W, the input
    gradient dy W^T and the weight gradient x^T dy; the same for the LM head. Attention runs seven dots
    per layer over the full square, as bpo_jax.models.attention does on one CPU device: forward QK^T
    and PV, then the backward recomputes QK^T and forms dP, dV, dQ and dK (heads first, grouped query
    heads as rows).
    """
    m, h = rows * seq_len, config.hidden_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layers = config.num_hidden_layers
    projections = {"q": (h, q, 1), "k/v": (h, kv, 2), "o": (q, h, 1), "gate/up": (h, config.intermediate_size, 2),
                   "down": (config.intermediate_size, h, 1)}
    out = []
    for name, (i, o, per_layer) in projections.items():
        count = per_layer * layers
        out += [(f"{name} forward", count, "mi,io->mo", (m, i), (i, o)),
                (f"{name} input gradient", count, "mo,io->mi", (m, o), (i, o)),
                (f"{name} weight gradient", count, "mi,mo->io", (m, i), (m, o))]
    v = config.vocab_size
    out += [("LM head forward", 1, "mh,vh->mv", (m, h), (v, h)), ("LM head input gradient", 1, "mv,vh->mh", (m, v), (v, h)),
            ("LM head weight gradient", 1, "mv,mh->vh", (m, v), (m, h))]
    k, g, d, t = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads, config.head_dim, seq_len
    query, key, square = (rows, k, g * t, d), (rows, k, t, d), (rows, k, g * t, t)
    out += [("attention QK^T and dP = dO V^T", 3 * layers, "bkmd,bksd->bkms", query, key),  # forward, recomputed, dP
            ("attention PV and dQ = dS K", 2 * layers, "bkms,bksd->bkmd", square, key),
            ("attention dV = P^T dO and dK = dS^T Q", 2 * layers, "bkms,bkmd->bksd", square, query)]
    return out


def einsum_flops(spec: str, lhs: tuple, rhs: tuple) -> int:
    """2 x the product of every distinct dimension of a two-operand einsum (a multiply-add per term)."""
    operands = spec.split("->")[0].split(",")
    sizes = dict(zip(operands[0], lhs)) | dict(zip(operands[1], rhs))
    return 2 * math.prod(sizes.values())
