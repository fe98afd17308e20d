"""DPO-family losses on sequence log-probs, as pure jnp functions.

Conventions
-----------
A sequence batch is right-padded token ids ``input_ids`` [B, T] with ``loss_mask`` [B, T] aligned to
them: 1 on response tokens that are to be predicted (the final EOS included), 0 on prompt and
padding. Logits [B, T, V] come from a causal LM, so ``logits[:, t]`` predicts ``input_ids[:, t+1]``:
the log-prob of token t >= 1 is ``log_softmax(logits[:, t-1])[input_ids[:, t]]``, and it counts
where ``loss_mask[:, t] == 1``. Token 0 can never be predicted, so ``loss_mask[:, 0]`` is ignored.
Token ids must lie in [0, V); an out-of-range id gives a NaN log-prob rather than a silent value.

What the caller passes to ``preference_loss``
---------------------------------------------
``sigmoid``, ``robust`` and ``hinge`` take summed response log-probs (``sum_logps``) of policy and
reference. ``ipo`` and ``simpo`` take length-averaged log-probs (``mean_logps``), as TRL and the IPO
and SimPO papers do; ``loss_uses_mean_logps(loss_type)`` says which one a loss wants. ``simpo`` is
reference-free: its reference arguments may be None and are ignored. SimPO's ``gamma`` is the
absolute target margin (TRL's ``gamma_beta_ratio`` equals ``gamma / beta``).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from bpo_jax.models.matmul import single_cpu_device

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "hinge", "ipo", "simpo")

_MEAN_LOGPS_LOSSES = frozenset({"ipo", "simpo"})
_REFERENCE_FREE_LOSSES = frozenset({"simpo"})
# Allowed label_smoothing per loss: (upper bound, upper bound inclusive?). Others must use 0.
_LABEL_SMOOTHING_RANGE = {"sigmoid": (0.5, True), "simpo": (0.5, True), "robust": (0.5, False)}


# --------------------------------------------------------------------------------------------
# Sequence log-probs
# --------------------------------------------------------------------------------------------


def token_logps(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Log-prob of each next token: [B, T, V] logits, [B, T] ids -> [B, T-1] float32.

    Entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]). The softmax runs in float32 even for
    bf16 logits; picking the label logit and subtracting the logsumexp avoids a second [B, T, V]
    array for the full log_softmax. On a single CPU device the backward pass writes d logits in one
    elementwise pass (`_lean_token_logps`); meshes keep JAX's own rules (as bpo_jax.models.attention
    explains for attention).
    """
    if single_cpu_device():
        return _lean_token_logps(logits, input_ids)
    shifted = logits[:, :-1].astype(jnp.float32)
    labels = input_ids[:, 1:]
    picked = jnp.take_along_axis(shifted, labels[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(shifted, axis=-1)


@jax.custom_vjp
def _lean_token_logps(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """`token_logps` whose backward pass is g * (one_hot(label) - softmax), written in one pass over
    the logits. Autodiff of the expression instead scattered the label gradients into a [B, T-1, V]
    array and padded it to [B, T, V]: two more vocabulary-sized arrays at the DPO step's memory peak
    (2 x 192 MiB at SmolLM2-135M shape, measured)."""
    return _token_logps_forward(logits, input_ids)[0]


def _token_logps_forward(logits, input_ids):
    logits32 = logits.astype(jnp.float32)
    # Every position's logsumexp (the last one predicts nothing; it keeps the backward pass finite).
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32[:, :-1], input_ids[:, 1:, None], axis=-1)[..., 0]
    return picked - lse[:, :-1], lse


def _token_logps_fwd(logits, input_ids):
    out, lse = _token_logps_forward(logits, input_ids)
    return out, (logits, input_ids, lse)


def _token_logps_bwd(residuals, g):
    logits, input_ids, lse = residuals
    g = jnp.pad(g, ((0, 0), (0, 1)))  # the last position predicts nothing
    labels = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    is_label = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    softmax = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    d_logits = g[..., None] * (is_label.astype(jnp.float32) - softmax)
    return d_logits.astype(logits.dtype), None


_lean_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def _masked_sum_mean(
    per_token: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sum, mean and count of [B, T-1] next-token log-probs over response tokens."""
    mask = loss_mask[:, 1:] != 0
    n_tokens = mask.sum(axis=-1).astype(jnp.float32)
    # where (not multiply) so a NaN on an unscored position cannot leak into the sum.
    total = jnp.where(mask, per_token, 0.0).sum(axis=-1)
    return total, total / jnp.maximum(n_tokens, 1.0), n_tokens


def sequence_logps(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Response log-probs per sequence: (sum_logps [B], mean_logps [B], n_tokens [B]).

    mean = sum / n_tokens, and 0 for a sequence with no response token.
    """
    _check_sequence_shapes(input_ids, loss_mask, logits.shape[:2], "logits")
    return _masked_sum_mean(token_logps(logits, input_ids), loss_mask)


def chunked_sequence_logps(
    hidden: jax.Array,
    lm_head_kernel: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    *,
    vocab_chunk: int = 8192,
    seq_chunk: int | None = None,
    logit_dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``sequence_logps(hidden @ lm_head_kernel, ...)`` without ever holding [B, T, V] logits.

    hidden [B, T, H] are the final normed hidden states, lm_head_kernel [H, V]; the per-token
    log-probs come from ``chunked_token_logps`` (see there for the chunking).
    """
    _check_sequence_shapes(input_ids, loss_mask, hidden.shape[:2], "hidden")
    per_token = chunked_token_logps(
        hidden, lm_head_kernel, input_ids, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk, logit_dtype=logit_dtype
    )
    return _masked_sum_mean(per_token, loss_mask)


def chunked_token_logps(
    hidden: jax.Array,
    lm_head_kernel: jax.Array,
    input_ids: jax.Array,
    *,
    vocab_chunk: int = 8192,
    seq_chunk: int | None = None,
    logit_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """``token_logps(hidden @ lm_head_kernel, input_ids)`` [B, T-1] without [B, T, V] logits.

    The vocabulary is scanned in chunks of ``vocab_chunk`` columns with a running (online)
    logsumexp, and the label logit is read from the chunk that holds it; both the scan body and
    each sequence chunk are rematerialized (jax.checkpoint), so the backward pass recomputes one
    chunk of logits at a time instead of storing them. ``seq_chunk`` additionally splits the T-1
    predicted positions into chunks of that length (lax.map), bounding the live logits to
    [B, seq_chunk, vocab_chunk]. ``logit_dtype`` is the matmul output dtype; the logsumexp always
    accumulates in float32.
    """
    if input_ids.ndim != 2 or tuple(hidden.shape[:2]) != tuple(input_ids.shape) or input_ids.shape[1] < 2:
        raise ValueError(
            f"hidden must be [B, T, H] and input_ids [B, T] with T >= 2; got {tuple(hidden.shape)} and "
            f"{tuple(input_ids.shape)}"
        )
    if lm_head_kernel.ndim != 2 or lm_head_kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_kernel must be [H, V] with H = hidden.shape[-1] = {hidden.shape[-1]}; "
            f"got shape {tuple(lm_head_kernel.shape)}"
        )
    _check_positive_int(vocab_chunk, "vocab_chunk")
    if seq_chunk is not None:
        _check_positive_int(seq_chunk, "seq_chunk")

    token_fn = jax.checkpoint(
        partial(
            _vocab_chunked_token_logps,
            kernel=lm_head_kernel,
            vocab_chunk=vocab_chunk,
            logit_dtype=logit_dtype,
        )
    )
    states, labels = hidden[:, :-1], input_ids[:, 1:]
    if seq_chunk is None:
        return token_fn(states, labels)
    return _map_over_seq_chunks(token_fn, states, labels, seq_chunk)


def packed_sequence_logps(
    per_token: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, num_sequences: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sequence (sum_logps, mean_logps, n_tokens) [num_sequences] of packed rows.

    per_token [R, T-1] are next-token log-probs of rows [R, T] holding several sequences each;
    sequence s is segment id s + 1 (0 is padding). A token counts when its loss_mask is 1 and it is
    predicted from a token of its own segment, so the first token of a segment (predicted from the
    previous segment's last token) never counts, as token 0 of a padded row never does. The sums
    are segment sums, equal to ``sequence_logps`` of the same sequences padded one per row.
    """
    scored, seg = _packed_scored(loss_mask, segment_ids, num_sequences)
    values = jnp.where(scored, per_token, 0.0)
    total = jax.ops.segment_sum(values.ravel(), seg.ravel(), num_segments=num_sequences + 1)[:-1]
    n_tokens = packed_token_counts(loss_mask, segment_ids, num_sequences)
    return total, total / jnp.maximum(n_tokens, 1.0), n_tokens


def packed_token_counts(loss_mask: jax.Array, segment_ids: jax.Array, num_sequences: int) -> jax.Array:
    """Scored tokens of each packed sequence [num_sequences] (see ``packed_sequence_logps``)."""
    scored, seg = _packed_scored(loss_mask, segment_ids, num_sequences)
    ones = scored.astype(jnp.float32)
    return jax.ops.segment_sum(ones.ravel(), seg.ravel(), num_segments=num_sequences + 1)[:-1]


def _packed_scored(loss_mask, segment_ids, num_sequences: int) -> tuple[jax.Array, jax.Array]:
    """Which of the T-1 predicted tokens count, and their sequence (num_sequences when none)."""
    if loss_mask.shape != segment_ids.shape or loss_mask.ndim != 2:
        raise ValueError(
            f"loss_mask and segment_ids must both be [R, T]; got {tuple(loss_mask.shape)} and "
            f"{tuple(segment_ids.shape)}"
        )
    target = segment_ids[:, 1:]
    scored = (loss_mask[:, 1:] != 0) & (target == segment_ids[:, :-1]) & (target > 0) & (target <= num_sequences)
    return scored, jnp.where(scored, target - 1, num_sequences)


def _vocab_chunked_token_logps(
    states: jax.Array,
    labels: jax.Array,
    *,
    kernel: jax.Array,
    vocab_chunk: int,
    logit_dtype: jnp.dtype,
) -> jax.Array:
    """log_softmax(states @ kernel)[labels] by a scan over vocabulary chunks; [..., H] -> [...].

    When V is not a multiple of the chunk, the last chunk is slid back to end at V (no padded copy
    of the kernel) and its columns already covered by the previous chunk are masked out.
    """
    vocab = kernel.shape[1]
    chunk = min(vocab_chunk, vocab)
    n_chunks = -(-vocab // chunk)

    @jax.checkpoint
    def step(carry, c):
        run_max, run_sum, label_logit = carry
        first = c * chunk
        start = jnp.minimum(first, vocab - chunk)
        weights = lax.dynamic_slice_in_dim(kernel, start, chunk, axis=1)
        logits = jnp.matmul(states, weights, preferred_element_type=logit_dtype)
        logits = logits.astype(jnp.float32)
        fresh = start + jnp.arange(chunk) >= first
        logits = jnp.where(fresh, logits, -jnp.inf)
        # logsumexp does not depend on the shift, so the max carries no gradient.
        new_max = jnp.maximum(run_max, lax.stop_gradient(logits.max(axis=-1)))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(
            logits - new_max[..., None]
        ).sum(axis=-1)
        offset = jnp.clip(labels - start, 0, chunk - 1)
        picked = jnp.take_along_axis(logits, offset[..., None], axis=-1)[..., 0]
        label_logit = jnp.where(labels // chunk == c, picked, label_logit)
        return (new_max, run_sum, label_logit), None

    shape = labels.shape
    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.full(shape, jnp.nan, jnp.float32),  # stays NaN for an id outside [0, V)
    )
    (run_max, run_sum, label_logit), _ = lax.scan(step, init, jnp.arange(n_chunks))
    return label_logit - (run_max + jnp.log(run_sum))


def _map_over_seq_chunks(token_fn, states: jax.Array, labels: jax.Array, seq_chunk: int):
    """Apply token_fn to [B, seq_chunk] slices of the positions one after another (lax.map)."""
    batch, length = labels.shape
    n_chunks = -(-length // seq_chunk)
    pad = n_chunks * seq_chunk - length
    states = jnp.pad(states, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))  # id 0 is valid; padded positions are dropped
    states = states.reshape(batch, n_chunks, seq_chunk, -1).swapaxes(0, 1)
    labels = labels.reshape(batch, n_chunks, seq_chunk).swapaxes(0, 1)
    per_token = lax.map(lambda xs: token_fn(*xs), (states, labels))
    return per_token.swapaxes(0, 1).reshape(batch, -1)[:, :length]


def _check_sequence_shapes(input_ids, loss_mask, lead_shape, name: str) -> None:
    if input_ids.ndim != 2 or input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"input_ids and loss_mask must both be [B, T]; got {tuple(input_ids.shape)} and "
            f"{tuple(loss_mask.shape)}"
        )
    if tuple(lead_shape) != tuple(input_ids.shape):
        raise ValueError(
            f"{name} must start with [B, T] = {tuple(input_ids.shape)}; got {tuple(lead_shape)}"
        )
    if input_ids.shape[1] < 2:
        raise ValueError(f"sequences need T >= 2 tokens to score any; got T = {input_ids.shape[1]}")


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


# --------------------------------------------------------------------------------------------
# Preference losses
# --------------------------------------------------------------------------------------------


def loss_uses_mean_logps(loss_type: str) -> bool:
    """True when ``loss_type`` expects length-averaged log-probs (ipo, simpo), else summed."""
    _check_loss_type(loss_type)
    return loss_type in _MEAN_LOGPS_LOSSES


def preference_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None,
    ref_rejected_logps: jax.Array | None,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair loss [B] and the implicit rewards (chosen [B], rejected [B]) of a DPO-family loss.

    With h = (pc - rc) - (pr - rr) and ls = label_smoothing:
      sigmoid  -logsig(beta h)(1-ls) - logsig(-beta h) ls          (DPO; ls > 0 is cDPO)
      robust   (-logsig(beta h)(1-ls) + logsig(-beta h) ls) / (1 - 2 ls)
      hinge    relu(1 - beta h)
      ipo      (h - 1/(2 beta))^2                                   (mean log-probs)
      simpo    -logsig(x)(1-ls) - logsig(-x) ls, x = beta (pc - pr) - gamma  (mean log-probs,
               no reference)
    Rewards are beta (policy - reference) (beta * policy for simpo) and carry no gradient: they
    are metrics. Hyperparameters are checked in Python before tracing; they must be concrete.
    """
    beta, label_smoothing, gamma = _check_hyperparameters(loss_type, beta, label_smoothing, gamma)
    reference_free = loss_type in _REFERENCE_FREE_LOSSES
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(
            f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps "
            "(only 'simpo' is reference-free)"
        )
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
    }
    if not reference_free:
        named |= {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    shapes = {name: jnp.shape(value) for name, value in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"log-prob arrays must share one shape; got {shapes}")

    pc, pr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen_logps, policy_rejected_logps))
    if reference_free:
        chosen_ratio, rejected_ratio = pc, pr
    else:
        rc, rr = (jnp.asarray(x, jnp.float32) for x in (ref_chosen_logps, ref_rejected_logps))
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio
    ls = label_smoothing
    log_sig = jax.nn.log_sigmoid

    if loss_type == "sigmoid":
        losses = -log_sig(beta * h) * (1 - ls) - log_sig(-beta * h) * ls
    elif loss_type == "robust":
        losses = (-log_sig(beta * h) * (1 - ls) + log_sig(-beta * h) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # simpo
        x = beta * h - gamma
        losses = -log_sig(x) * (1 - ls) - log_sig(-x) * ls

    chosen_rewards = lax.stop_gradient(beta * chosen_ratio)
    rejected_rewards = lax.stop_gradient(beta * rejected_ratio)
    return losses, chosen_rewards, rejected_rewards


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def _check_hyperparameters(
    loss_type: str, beta, label_smoothing, gamma
) -> tuple[float, float, float]:
    """Validate and return (beta, label_smoothing, gamma) as Python floats."""
    _check_loss_type(loss_type)
    values = {}
    for name, value in (("beta", beta), ("label_smoothing", label_smoothing), ("gamma", gamma)):
        try:
            values[name] = float(value)
        except (TypeError, jax.errors.ConcretizationTypeError):
            raise ValueError(
                f"{name} must be a concrete number, not a traced value; got {value!r}"
            ) from None
        if not math.isfinite(values[name]):
            raise ValueError(f"{name} must be finite; got {value!r}")
    beta, ls, gamma = values["beta"], values["label_smoothing"], values["gamma"]
    if beta <= 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    if loss_type in _LABEL_SMOOTHING_RANGE:
        upper, inclusive = _LABEL_SMOOTHING_RANGE[loss_type]
        if ls < 0 or ls > upper or (ls == upper and not inclusive):
            interval = f"[0, {upper}]" if inclusive else f"[0, {upper})"
            raise ValueError(
                f"label_smoothing for loss_type {loss_type!r} must be in {interval}; got {ls}"
            )
    elif ls != 0:
        raise ValueError(
            f"label_smoothing is not used by loss_type {loss_type!r} (only by "
            f"{', '.join(_LABEL_SMOOTHING_RANGE)}); got {ls}"
        )
    if loss_type != "simpo" and gamma != 0:
        raise ValueError(
            f"gamma is only used by loss_type 'simpo'; got gamma={gamma} for {loss_type!r}"
        )
    return beta, ls, gamma


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def batch_mean(values: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Mean of [B] values over the valid rows (all rows when ``valid`` is None).

    ``valid`` [B] is a bool mask or nonnegative weights; rows a batch was padded with (to reach a
    fixed global batch size) get 0 and drop out of both sum and count. No valid row -> 0.
    """
    values = jnp.asarray(values, jnp.float32)
    if valid is None:
        return values.mean()
    if jnp.shape(valid) != values.shape:
        raise ValueError(f"valid must have the batch shape {values.shape}; got {jnp.shape(valid)}")
    weights = jnp.asarray(valid, jnp.float32)
    total = jnp.where(weights != 0, values * weights, 0.0).sum()
    count = weights.sum()
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def dpo_metrics(
    losses: jax.Array,
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    valid: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Batch means under TRL's metric names, over valid rows only (see ``batch_mean``)."""
    mean = partial(batch_mean, valid=valid)
    return {
        "loss": mean(losses),
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracies": mean(chosen_rewards > rejected_rewards),
        "rewards/margins": mean(chosen_rewards - rejected_rewards),
        "logps/chosen": mean(policy_chosen_logps),
        "logps/rejected": mean(policy_rejected_logps),
    }
