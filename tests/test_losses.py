"""DPO-family losses and sequence log-probs against independent hand/NumPy computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpo_jax import losses as losses_module
from bpo_jax.losses import (
    LOSS_TYPES,
    batch_mean,
    chunked_sequence_logps,
    dpo_metrics,
    loss_uses_mean_logps,
    preference_loss,
    sequence_logps,
    token_logps,
)

# Exactly representable in float32, so h is exact: h = (pc - rc) - (pr - rr) = [1.0, -2.0, 1.5].
PC = [-10.5, -20.0, -3.25]
PR = [-12.0, -18.5, -3.25]
RC = [-11.0, -19.0, -4.0]
RR = [-11.5, -19.5, -2.5]


def _log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)) in float64, written without overflow for either sign."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def _hand_loss(loss_type, pc, pr, rc, rr, beta, ls, gamma):
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -_log_sigmoid(beta * h) * (1 - ls) - _log_sigmoid(-beta * h) * ls
    if loss_type == "robust":
        return (-_log_sigmoid(beta * h) * (1 - ls) + _log_sigmoid(-beta * h) * ls) / (1 - 2 * ls)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    x = beta * (pc - pr) - gamma  # simpo: no reference
    return -_log_sigmoid(x) * (1 - ls) - _log_sigmoid(-x) * ls


CASES = [
    ("sigmoid", 0.1, 0.0, 0.0),
    ("sigmoid", 0.1, 0.2, 0.0),  # cDPO
    ("sigmoid", 0.5, 0.5, 0.0),  # upper end allowed for sigmoid
    ("sigmoid", 1e-6, 0.0, 0.0),  # tiny beta: loss -> log 2
    ("sigmoid", 50.0, 0.0, 0.0),  # large beta: beta*h = -100 on row 1
    ("robust", 0.1, 0.0, 0.0),
    ("robust", 0.1, 0.3, 0.0),
    ("robust", 20.0, 0.1, 0.0),
    ("hinge", 0.1, 0.0, 0.0),
    ("hinge", 2.0, 0.0, 0.0),  # row 0 in the linear part, rows with beta*h >= 1 clipped to 0
    ("ipo", 0.1, 0.0, 0.0),
    ("ipo", 1e-6, 0.0, 0.0),
    ("ipo", 50.0, 0.0, 0.0),
    ("simpo", 2.0, 0.0, 0.5),
    ("simpo", 2.0, 0.1, 1.4),
    ("simpo", 1e-6, 0.0, 0.0),
]


@pytest.mark.parametrize("loss_type,beta,ls,gamma", CASES)
def test_losses_and_rewards_match_hand_values(loss_type, beta, ls, gamma):
    refs = (None, None) if loss_type == "simpo" else (jnp.array(RC), jnp.array(RR))
    losses, chosen, rejected = preference_loss(
        jnp.array(PC), jnp.array(PR), *refs,
        loss_type=loss_type, beta=beta, label_smoothing=ls, gamma=gamma,
    )
    rows = list(zip(PC, PR, RC, RR))
    expected = [_hand_loss(loss_type, *row, beta, ls, gamma) for row in rows]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5, atol=1e-30)
    if loss_type == "simpo":
        exp_chosen = [beta * pc for pc in PC]
        exp_rejected = [beta * pr for pr in PR]
    else:
        exp_chosen = [beta * (pc - rc) for pc, _, rc, _ in rows]
        exp_rejected = [beta * (pr - rr) for _, pr, _, rr in rows]
    np.testing.assert_allclose(np.asarray(chosen), exp_chosen, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(rejected), exp_rejected, rtol=1e-6, atol=1e-12)


def test_tiny_beta_sigmoid_is_log2():
    losses, _, _ = preference_loss(
        jnp.array(PC), jnp.array(PR), jnp.array(RC), jnp.array(RR), loss_type="sigmoid", beta=1e-9
    )
    np.testing.assert_allclose(np.asarray(losses), math.log(2.0), rtol=1e-6)


def test_sigmoid_with_zero_smoothing_equals_robust_with_zero_smoothing():
    args = (jnp.array(PC), jnp.array(PR), jnp.array(RC), jnp.array(RR))
    a = preference_loss(*args, loss_type="sigmoid", beta=0.3)[0]
    b = preference_loss(*args, loss_type="robust", beta=0.3)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def _large_h_inputs():
    """Policy log-probs giving h = +1e4 on row 0 and -1e4 on row 1 against zero references."""
    pc = jnp.array([5000.0, -5000.0])
    pr = -pc
    zeros = jnp.zeros(2)
    return pc, pr, zeros, zeros


def _total_loss(loss_type, beta, ls):
    """Summed loss as a function of the policy log-probs, references fixed at zero."""
    _, _, rc, rr = _large_h_inputs()

    def total(pc, pr):
        return preference_loss(
            pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=ls
        )[0].sum()

    return total


LARGE_H_CASES = [(t, 0.0) for t in LOSS_TYPES] + [("sigmoid", 0.2), ("robust", 0.2)]


@pytest.mark.parametrize("loss_type,ls", LARGE_H_CASES)
def test_gradients_finite_at_large_h(loss_type, ls):
    pc, pr, _, _ = _large_h_inputs()
    total = _total_loss(loss_type, 0.1, ls)
    value = total(pc, pr)
    grads = jax.grad(total, argnums=(0, 1))(pc, pr)
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_sigmoid_at_large_h_equals_its_asymptote(ls):
    beta = 0.1
    pc, pr, rc, rr = _large_h_inputs()
    h = np.array([1e4, -1e4])
    losses = preference_loss(pc, pr, rc, rr, loss_type="sigmoid", beta=beta, label_smoothing=ls)[0]
    # -logsig(z) -> relu(-z) as |z| -> inf, so loss -> (1-ls) relu(-beta h) + ls relu(beta h).
    asymptote = (1 - ls) * np.maximum(-beta * h, 0) + ls * np.maximum(beta * h, 0)
    np.testing.assert_allclose(np.asarray(losses), asymptote, rtol=1e-6, atol=1e-30)
    grad_pc = jax.grad(_total_loss("sigmoid", beta, ls))(pc, pr)
    # d loss / d pc = d loss / d h: slope ls*beta for h -> +inf, -(1-ls)*beta for h -> -inf.
    slopes = [ls * beta, -(1 - ls) * beta]
    np.testing.assert_allclose(np.asarray(grad_pc), slopes, rtol=1e-6, atol=1e-30)


def test_rewards_carry_no_gradient():
    rest = (jnp.array(PR), jnp.array(RC), jnp.array(RR))
    chosen_reward_sum = lambda pc: preference_loss(pc, *rest, loss_type="sigmoid", beta=0.1)[1].sum()  # noqa: E731
    grad = jax.grad(chosen_reward_sum)(jnp.array(PC))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_loss_uses_mean_logps():
    assert {t for t in LOSS_TYPES if loss_uses_mean_logps(t)} == {"ipo", "simpo"}
    with pytest.raises(ValueError, match="unknown loss_type 'dpo'"):
        loss_uses_mean_logps("dpo")


# ---------------------------------------------------------------------------------------------
# Sequence log-probs
# ---------------------------------------------------------------------------------------------


def _random_batch(seed, batch, length, vocab, hidden_size=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    # Row 0: prompt 3 tokens, response to the end. Row 1: prompt 2, response 3, padding.
    mask[0, 3:] = 1
    mask[1, 2:5] = 1
    if batch > 2:
        mask[2, :] = 1  # mask[:, 0] = 1 must be ignored: token 0 is never predicted
    if batch > 3:
        mask[3, :] = 0  # no response token at all
    if hidden_size is None:
        return rng.normal(size=(batch, length, vocab)).astype(np.float32) * 3, ids, mask
    hidden = rng.normal(size=(batch, length, hidden_size)).astype(np.float32)
    kernel = rng.normal(size=(hidden_size, vocab)).astype(np.float32) * 0.5
    return hidden, kernel, ids, mask


def _loop_sequence_logps(logits, ids, mask):
    """Reference: explicit loops in float64."""
    batch, length, _ = logits.shape
    token = np.zeros((batch, length - 1))
    sums, counts = np.zeros(batch), np.zeros(batch)
    for b in range(batch):
        for t in range(1, length):
            row = logits[b, t - 1].astype(np.float64)
            lp = row[ids[b, t]] - math.log(sum(math.exp(v) for v in row))
            token[b, t - 1] = lp
            if mask[b, t]:
                sums[b] += lp
                counts[b] += 1
    means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return token, sums, means, counts


def test_token_and_sequence_logps_match_explicit_loops():
    logits, ids, mask = _random_batch(0, batch=4, length=7, vocab=11)
    token_ref, sum_ref, mean_ref, count_ref = _loop_sequence_logps(logits, ids, mask)
    per_token = token_logps(jnp.array(logits), jnp.array(ids))
    np.testing.assert_allclose(np.asarray(per_token), token_ref, rtol=1e-5)
    total, mean, count = sequence_logps(jnp.array(logits), jnp.array(ids), jnp.array(mask))
    np.testing.assert_allclose(np.asarray(total), sum_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean), mean_ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(count), count_ref)
    np.testing.assert_array_equal(count_ref, [4, 3, 6, 0])  # the masks above, first token excluded
    assert float(mean[3]) == 0.0


def test_token_logps_upcasts_bf16_logits():
    logits, ids, _ = _random_batch(1, batch=2, length=5, vocab=7)
    bf16 = jnp.array(logits).astype(jnp.bfloat16)
    out = token_logps(bf16, jnp.array(ids))
    assert out.dtype == jnp.float32
    expected = _loop_sequence_logps(np.asarray(bf16.astype(jnp.float32)), ids, np.ones_like(ids))[0]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)


def _softmax_gradient_loops(logits, ids, weights):
    """d/dlogits of sum_t weights[b, t-1] * log p(ids[b, t]): w (one_hot(label) - softmax) per row."""
    grad = np.zeros(logits.shape, np.float64)
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            row = logits[b, t - 1].astype(np.float64)
            softmax = np.exp(row - row.max())
            softmax /= softmax.sum()
            grad[b, t - 1] = -weights[b, t - 1] * softmax
            grad[b, t - 1, ids[b, t]] += weights[b, t - 1]
    return grad


@pytest.fixture(params=["mesh", "one_cpu"])
def device(request, monkeypatch):
    """token_logps as on a mesh (the tests' 8 emulated devices: JAX's own backward) and as on one CPU
    device (the one-pass backward)."""
    if request.param == "one_cpu":
        monkeypatch.setattr(losses_module, "single_cpu_device", lambda: True)
    return request.param


def test_token_logps_gradient_matches_the_softmax_formula_also_per_sample_and_bf16(device):
    logits, ids, _ = _random_batch(2, batch=3, length=6, vocab=13)
    weights = np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32)
    expected = _softmax_gradient_loops(logits, ids, weights)
    loss = lambda x, i, w: jnp.sum(token_logps(x, i) * w)
    got = jax.grad(loss)(jnp.array(logits), jnp.array(ids), jnp.array(weights))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    assert not np.asarray(got)[:, -1].any()  # the last position predicts nothing
    per_sample = jax.vmap(jax.grad(lambda x, i, w: loss(x[None], i[None], w[None])))(
        jnp.array(logits), jnp.array(ids), jnp.array(weights)
    )
    np.testing.assert_allclose(np.asarray(per_sample), expected, rtol=1e-5, atol=1e-6)
    bf16 = jnp.array(logits).astype(jnp.bfloat16)
    got16 = jax.grad(loss)(bf16, jnp.array(ids), jnp.array(weights))
    assert got16.dtype == jnp.bfloat16
    expected16 = _softmax_gradient_loops(np.asarray(bf16.astype(jnp.float32)), ids, weights)
    np.testing.assert_allclose(np.asarray(got16.astype(jnp.float32)), expected16, atol=0.01)


def test_token_logps_backward_holds_no_vocabulary_sized_temporary(device):
    """Autodiff of the plain expression scatters the label gradients into a [B, T-1, V] temporary
    before padding them into d logits [B, T, V]; the custom backward writes d logits in one pass."""
    b, t, v = 4, 64, 8192
    logits = jax.ShapeDtypeStruct((b, t, v), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(f):
        grad = jax.jit(jax.grad(lambda x, i: jnp.sum(f(x, i) * jnp.arange(t - 1.0))))
        return grad.lower(logits, ids).compile().memory_analysis().temp_size_in_bytes

    def plain(x, i):
        shifted = x[:, :-1]
        picked = jnp.take_along_axis(shifted, i[:, 1:, None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(shifted, axis=-1)

    size = b * t * v * 4
    assert temp_bytes(plain) >= 0.9 * size  # what the test would catch
    if device == "one_cpu":
        assert temp_bytes(token_logps) < 0.1 * size
    else:
        assert temp_bytes(token_logps) == temp_bytes(plain)


def _plain_from_hidden(hidden, kernel, ids, mask):
    return sequence_logps(hidden @ kernel, ids, mask)


CHUNK_CASES = [
    (96, 32, None),  # V divisible by the chunk
    (100, 32, None),  # ragged: the last chunk slides back and overlaps
    (100, 32, 4),  # plus sequence chunks; T-1 = 9 is not a multiple of 4
    (100, 128, 3),  # chunk larger than V
    (100, 1, None),  # one column per chunk
]


@pytest.mark.parametrize("vocab,vocab_chunk,seq_chunk", CHUNK_CASES)
def test_chunked_logps_and_gradients_equal_plain_path(vocab, vocab_chunk, seq_chunk):
    hidden, kernel, ids, mask = _random_batch(2, batch=4, length=10, vocab=vocab, hidden_size=8)
    # Labels at chunk edges and inside the overlap of the slid-back last chunk.
    ids[0, 3:10] = [0, vocab_chunk - 1 if vocab_chunk < vocab else 1, 63, 64, 70, vocab - 4, vocab - 1]
    args = tuple(map(jnp.array, (hidden, kernel, ids, mask)))
    chunked = jax.jit(
        lambda h, w: chunked_sequence_logps(
            h, w, args[2], args[3], vocab_chunk=vocab_chunk, seq_chunk=seq_chunk
        )
    )
    plain = jax.jit(lambda h, w: _plain_from_hidden(h, w, args[2], args[3]))

    for got, want in zip(chunked(*args[:2]), plain(*args[:2])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

    row_weights = jnp.array([0.3, -1.2, 0.7, 2.0])

    def objective(fn):
        def f(h, w):
            total, mean, _ = fn(h, w)
            return (row_weights * total).sum() + (row_weights * mean).sum()
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    for got, want in zip(objective(chunked)(*args[:2]), objective(plain)(*args[:2])):
        assert np.abs(np.asarray(want)).max() > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_chunked_logps_bf16_logits_close_to_fp32():
    hidden, kernel, ids, mask = map(jnp.array, _random_batch(3, batch=2, length=6, vocab=50, hidden_size=8))
    want = _plain_from_hidden(hidden, kernel, ids, mask)[0]
    got = jax.jit(
        lambda h, w: chunked_sequence_logps(h, w, ids, mask, vocab_chunk=16, logit_dtype=jnp.bfloat16)[0]
    )(hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-2)


def test_chunked_grad_uses_much_less_temp_memory_than_plain():
    batch, length, hidden_size, vocab = 2, 64, 32, 32768
    hidden = jnp.zeros((batch, length, hidden_size))
    kernel = jnp.zeros((hidden_size, vocab))
    ids = jnp.zeros((batch, length), jnp.int32)
    mask = jnp.ones((batch, length), jnp.int32)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h, w: fn(h, w, ids, mask)[0].sum(), argnums=(0, 1)))
        try:
            stats = grad.lower(hidden, kernel).compile().memory_analysis()
        except (NotImplementedError, RuntimeError) as err:
            pytest.skip(f"memory_analysis unavailable on this backend: {err}")
        if stats is None:
            pytest.skip("memory_analysis returned None on this backend")
        return stats.temp_size_in_bytes

    plain = temp_bytes(_plain_from_hidden)
    chunked = temp_bytes(lambda h, w, i, m: chunked_sequence_logps(h, w, i, m, vocab_chunk=2048))
    logits_bytes = batch * length * vocab * 4
    assert plain >= logits_bytes  # the plain path holds at least one full fp32 logits array
    assert chunked < plain / 4
    assert chunked < logits_bytes / 2


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_dpo_metrics_hand_values_and_valid_rows():
    losses = jnp.array([0.5, 1.5, 2.0, 1e6])
    chosen = jnp.array([1.0, -1.0, 0.5, 1e6])
    rejected = jnp.array([0.0, 1.0, 0.5, -1e6])
    pc = jnp.array([-3.0, -5.0, -4.0, jnp.nan])
    pr = jnp.array([-6.0, -2.0, -4.0, 7.0])
    valid = jnp.array([True, True, True, False])  # row 3 is a dummy padding row

    got = {k: float(v) for k, v in dpo_metrics(losses, chosen, rejected, pc, pr, valid=valid).items()}
    expected = {
        "loss": (0.5 + 1.5 + 2.0) / 3,
        "rewards/chosen": (1.0 - 1.0 + 0.5) / 3,
        "rewards/rejected": (0.0 + 1.0 + 0.5) / 3,
        "rewards/accuracies": 1 / 3,  # only row 0 has chosen > rejected (row 2 is a tie)
        "rewards/margins": (1.0 - 2.0 + 0.0) / 3,
        "logps/chosen": -4.0,
        "logps/rejected": -4.0,
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key

    unmasked = dpo_metrics(losses[:3], chosen[:3], rejected[:3], pc[:3], pr[:3])
    for key, value in expected.items():
        assert float(unmasked[key]) == pytest.approx(value, rel=1e-6), key


def test_batch_mean_weights_and_empty():
    values = jnp.array([1.0, 2.0, 4.0])
    assert float(batch_mean(values, jnp.array([1.0, 0.0, 3.0]))) == pytest.approx((1 + 12) / 4)
    assert float(batch_mean(values, jnp.zeros(3, bool))) == 0.0
    with pytest.raises(ValueError, match="valid must have the batch shape"):
        batch_mean(values, jnp.ones(2, bool))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _call(**kwargs):
    defaults = dict(loss_type="sigmoid", beta=0.1)
    refs = kwargs.pop("refs", (jnp.array(RC), jnp.array(RR)))
    return preference_loss(jnp.array(PC), jnp.array(PR), *refs, **{**defaults, **kwargs})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(loss_type="kto"), "unknown loss_type 'kto'; valid: sigmoid, robust, hinge, ipo, simpo"),
        (dict(beta=0.0), "beta must be > 0; got 0.0"),
        (dict(beta=-1.0), "beta must be > 0; got -1.0"),
        (dict(beta=float("nan")), "beta must be finite"),
        (dict(label_smoothing=0.6), r"label_smoothing for loss_type 'sigmoid' must be in \[0, 0.5\]; got 0.6"),
        (dict(label_smoothing=-0.1), r"label_smoothing for loss_type 'sigmoid' must be in \[0, 0.5\]"),
        (dict(loss_type="robust", label_smoothing=0.5), r"'robust' must be in \[0, 0.5\); got 0.5"),
        (dict(loss_type="simpo", label_smoothing=0.7), r"'simpo' must be in \[0, 0.5\]"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing is not used by loss_type 'hinge'"),
        (dict(loss_type="ipo", gamma=0.5), "gamma is only used by loss_type 'simpo'"),
        (dict(refs=(None, None)), "loss_type 'sigmoid' needs ref_chosen_logps and ref_rejected_logps"),
        (dict(loss_type="ipo", refs=(jnp.array(RC), None)), "loss_type 'ipo' needs ref_chosen_logps"),
        (dict(refs=(jnp.array(RC), jnp.zeros(2))), "log-prob arrays must share one shape"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)


def test_traced_beta_is_rejected():
    with pytest.raises(ValueError, match="beta must be a concrete number"):
        jax.jit(lambda b: _call(beta=b)[0])(0.1)


def test_simpo_accepts_missing_references():
    losses, _, _ = _call(loss_type="simpo", beta=2.0, refs=(None, None))
    assert losses.shape == (3,)


def test_sequence_logps_shape_errors():
    logits, ids, mask = map(jnp.array, _random_batch(0, batch=2, length=5, vocab=7))
    with pytest.raises(ValueError, match=r"input_ids and loss_mask must both be \[B, T\]"):
        sequence_logps(logits, ids, mask[:, :4])
    with pytest.raises(ValueError, match=r"logits must start with \[B, T\] = \(2, 5\); got \(2, 4\)"):
        sequence_logps(logits[:, :4], ids, mask)
    hidden = jnp.zeros((2, 5, 8))
    with pytest.raises(ValueError, match=r"lm_head_kernel must be \[H, V\] with H = hidden.shape\[-1\] = 8"):
        chunked_sequence_logps(hidden, jnp.zeros((4, 7)), ids, mask)
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int; got 0"):
        chunked_sequence_logps(hidden, jnp.zeros((8, 7)), ids, mask, vocab_chunk=0)
    with pytest.raises(ValueError, match="seq_chunk must be a positive int; got 2.5"):
        chunked_sequence_logps(hidden, jnp.zeros((8, 7)), ids, mask, seq_chunk=2.5)
