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
