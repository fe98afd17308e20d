"""Per-pair gradient features (bpo_jax.gradients) against independent computations.

The reference for a feature is built the slow, obvious way: one `jax.grad` of the trainer's own
DPO loss per pair (a 1-row batch), the gradient leaves concatenated, an explicit dense projection
matrix assembled from `projection_block`, a matrix product and a normalization. vmap vs. per-pair
gradients differ only by float32 summation order: features (unit vectors) agree to 2e-5 per entry.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bpo_jax.config import LoraSection, OptimSection, TrainSection
from bpo_jax.gradients import (
    FeatureSettings,
    GradientFeaturizer,
    adam_moments,
    chunk_table,
    extract_features,
    pair_gradient_features,
    path_string,
    project,
    projection_block,
    read_feature_shards,
)
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.llama import Linear, init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.sharding import make_mesh
from bpo_jax.train import DPOTrainer

TOL = 2e-5  # max abs difference between unit-norm float32 features
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def tiny_model(lora_rank: int = 4, random_b: bool = True):
    """A tiny Llama with LoRA; random_b moves B off its zero init so A's gradients are non-zero."""
    model = init_model(ModelConfig(**TINY), seed=0)
    if lora_rank:
        add_lora(model, LoraSection(rank=lora_rank), seed=1)
    if lora_rank and random_b:
        for i, (_, m) in enumerate(nnx.iter_modules(model)):
            if isinstance(m, Linear) and m.lora_b is not None:
                m.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(100 + i), m.lora_b.shape))
    return model


def make_batch(n: int, length: int = 14, seed: int = 0, ref: bool = True) -> dict[str, np.ndarray]:
    """Right-padded DPO rows with varied prompt/response lengths (the batch format of batching.py)."""
    rng = np.random.default_rng(seed)
    batch = {}
    prompt_len = rng.integers(2, 6, n)
    for side in ("chosen", "rejected"):
        resp_len = rng.integers(2, length - 5, n)
        ids = rng.integers(3, TINY["vocab_size"], (n, length)).astype(np.int32)
        pos = np.arange(length)[None]
        attn = pos < (prompt_len + resp_len)[:, None]
        batch[f"{side}_input_ids"] = np.where(attn, ids, 0).astype(np.int32)
        batch[f"{side}_attention_mask"] = attn.astype(np.int32)
        batch[f"{side}_loss_mask"] = (attn & (pos >= prompt_len[:, None])).astype(np.int32)
    if ref:
        batch["ref_chosen_logps"] = rng.normal(-30, 3, n).astype(np.float32)
        batch["ref_rejected_logps"] = rng.normal(-30, 3, n).astype(np.float32)
    return batch


def per_pair_grads(model, batch, train: TrainSection, select=None):
    """[n, P] gradients of DPOTrainer's loss on each 1-row batch, leaves in jax.tree.leaves order.

    `select(path) -> bool` keeps a subset of the trainer's trainable leaves (by path string).
    Without reference log-probs in `batch`, a zero reference is passed (what the features use).
    """
    trainer = DPOTrainer(model, train, make_mesh((1, 1, 1), devices=jax.devices()[:1]), total_steps=1)
    params = trainer._initial_trainable

    @jax.jit
    def grad_one(row):
        return jax.grad(lambda p: trainer._micro_loss(p, trainer.frozen, None, row, 1.0)[0])(params)

    rows = []
    n = batch["chosen_input_ids"].shape[0]
    for i in range(n):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        row["valid"] = np.ones(1, np.float32)
        row.setdefault("ref_chosen_logps", np.zeros(1, np.float32))
        row.setdefault("ref_rejected_logps", np.zeros(1, np.float32))
        flat = jax.tree_util.tree_flatten_with_path(grad_one(row))[0]
        rows.append(np.concatenate([np.ravel(g) for p, g in flat if select is None or select(path_string(p))]))
    return np.stack(rows)


def dense_matrix(sizes, chunk_size: int, proj_dim: int, seed: int, projection: str) -> np.ndarray:
    """The whole [P, d] projection matrix, written out block by block (what `project` never builds)."""
    block = jax.jit(projection_block, static_argnums=(3, 4, 5))
    rows = []
    for leaf, n in enumerate(sizes):
        for chunk in range(-(-n // chunk_size)):
            used = min(chunk_size, n - chunk * chunk_size)
            rows.append(np.asarray(block(seed, leaf, chunk, chunk_size, proj_dim, projection))[:used])
    return np.concatenate(rows)


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- features vs. the slow reference ----------------------------------------------------------------


def test_vmap_features_equal_per_pair_grad_loop_and_dense_projection():
    model = tiny_model()
    batch = make_batch(5)
    settings = FeatureSettings(proj_dim=48, seed=3, chunk_size=100, beta=0.2)
    # micro_batch=3 on 5 rows: two micro-batches, the second padded with a repeated row.
    featurizer = GradientFeaturizer(model, settings, micro_batch=3)
    got = featurizer(batch)

    g = per_pair_grads(model, batch, TrainSection(beta=0.2))
    assert g.shape == (5, featurizer.num_params)
    first = featurizer.leaf_sizes[0]
    assert featurizer.leaf_paths[0].endswith("lora_a") and np.all(np.linalg.norm(g[:, :first], axis=1) > 0)
    p = dense_matrix(featurizer.leaf_sizes, 100, 48, 3, "rademacher")
    np.testing.assert_allclose(got, normalized(g @ p), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_regex_subset_mean_logp_loss_and_zero_reference_match_reference():
    model = tiny_model(lora_rank=0)
    batch = make_batch(3, seed=1, ref=False)
    pattern = r"layers/0/mlp/(up|down)_proj/kernel"
    settings = FeatureSettings(proj_dim=40, seed=11, chunk_size=512, trainable=pattern, loss_type="ipo",
                               beta=0.5, projection="gaussian")
    featurizer = GradientFeaturizer(model, settings)
    assert featurizer.leaf_paths == ["layers/0/mlp/down_proj/kernel", "layers/0/mlp/up_proj/kernel"]
    got = featurizer(batch)

    g = per_pair_grads(model, batch, TrainSection(loss_type="ipo", beta=0.5), select=lambda p: re.search(pattern, p))
    p = dense_matrix(featurizer.leaf_sizes, 512, 40, 11, "gaussian")
    np.testing.assert_allclose(got, normalized(g @ p), atol=TOL, rtol=0)


def test_adam_preconditioned_features_match_optax_adam_direction():
    """After a short DPO warm-up, features project the step optax's Adam would take for the pair."""
    model = tiny_model(random_b=False)  # fresh LoRA: the warm-up moves B
    train = TrainSection(beta=0.5, batch_size=4, optim=OptimSection(learning_rate=0.05, schedule="constant"))
    warm = make_batch(4, seed=5)
    warm["valid"] = np.ones(4, np.float32)
    trainer = DPOTrainer(model, train, make_mesh((1, 1, 1), devices=jax.devices()[:1]), total_steps=2)
    state = trainer.init_state()
    for _ in range(2):
        state, _ = trainer.train_step(state, warm)
    warmed = trainer.model_at(state)
    adam = adam_moments(state.opt_state)
    assert adam.count == 2

    batch = make_batch(3, seed=6)
    settings = FeatureSettings(proj_dim=32, seed=0, chunk_size=64, beta=0.5)
    got = GradientFeaturizer(warmed, settings, adam_state=adam)(batch)

    (inner,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState)]
    g = per_pair_grads(warmed, batch, train)
    leaves, treedef = jax.tree.flatten(inner.mu)
    sizes = [x.size for x in leaves]
    steps = []
    for row in g:
        parts = np.split(row, np.cumsum(sizes)[:-1])
        grad_tree = jax.tree.unflatten(treedef, [part.reshape(x.shape) for part, x in zip(parts, leaves)])
        update, _ = optax.scale_by_adam().update(grad_tree, inner)
        steps.append(np.concatenate([np.ravel(u) for u in jax.tree.leaves(update)]))
    p = dense_matrix(sizes, 64, 32, 0, "rademacher")
    np.testing.assert_allclose(got, normalized(np.stack(steps) @ p), atol=TOL, rtol=0)


def test_fresh_lora_has_zero_gradient_in_a():
    """With B = 0 (standard init) every dL/dA is exactly zero: why the pipeline warms up first."""
    model = tiny_model(random_b=False)
    batch = make_batch(2)
    only_a = pair_gradient_features(model, batch, proj_dim=16, trainable="lora_a", chunk_size=64)
    assert np.all(only_a == 0.0)  # (the other tests show these functions give non-zero features)


def test_same_seed_identical_features_other_seed_different():
    model = tiny_model()
    batch = make_batch(4, seed=2)
    first = pair_gradient_features(model, batch, proj_dim=64, seed=7, chunk_size=128)
    again = pair_gradient_features(model, batch, proj_dim=64, seed=7, chunk_size=128)
    other = pair_gradient_features(model, batch, proj_dim=64, seed=8, chunk_size=128)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0.1


def test_sharded_micro_batches_equal_single_device():
    model = tiny_model()
    batch = make_batch(8, seed=4)
    settings = FeatureSettings(proj_dim=32, seed=1, chunk_size=256)
    single = GradientFeaturizer(model, settings)(batch)
    mesh = make_mesh((8, 1, 1))
    sharded = GradientFeaturizer(model, settings, mesh=mesh)(batch)
    np.testing.assert_allclose(sharded, single, atol=TOL, rtol=0)


def test_adam_state_missing_a_trainable_leaf_is_an_error():
    model = tiny_model()
    featurizer = GradientFeaturizer(model, FeatureSettings(proj_dim=8, chunk_size=64))
    trainable = nnx.state(model, nnx.LoRAParam)
    params = jax.tree.map(jnp.zeros_like, trainable)
    adam = adam_moments(optax.adam(1e-3).init(params))
    adam.mu.pop(featurizer.leaf_paths[0])
    with pytest.raises(ValueError, match="no mu for trainable parameter"):
        GradientFeaturizer(model, FeatureSettings(proj_dim=8, chunk_size=64), adam_state=adam)


def test_rows_per_call_fits_memory_in_whole_micro_batches():
    featurizer = GradientFeaturizer(tiny_model(), FeatureSettings(proj_dim=8), micro_batch=8)
    assert featurizer.num_params == 4 * 512  # LoRA rank 4: 4 * sum(in + out) over the 7 projections
    per_row = 8 * featurizer.num_params  # float32, raw + preconditioned
    assert featurizer.rows_per_call(1000, memory_bytes=per_row * 43) == 40
    assert featurizer.rows_per_call(5, memory_bytes=per_row * 43) == 8  # one micro-batch holds them all
    assert featurizer.rows_per_call(1000, memory_bytes=per_row) == 8  # never below one micro-batch
    assert featurizer.rows_per_call(10**6, memory_bytes=1 << 40, max_rows=100) == 96


def test_trainable_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="no LoRA adapters"):
        GradientFeaturizer(tiny_model(lora_rank=0), FeatureSettings(proj_dim=8))
    with pytest.raises(ValueError, match="neither 'lora' nor a valid regex"):
        GradientFeaturizer(tiny_model(), FeatureSettings(proj_dim=8, trainable="layers/(0"))


# -- the projection itself --------------------------------------------------------------------------


def test_chunk_table_covers_every_leaf_entry_once():
    table = chunk_table([5, 12, 3], chunk_size=4)
    # (leaf, chunk, start, used)
    assert table.tolist() == [[0, 0, 0, 4], [0, 1, 4, 1], [1, 0, 5, 4], [1, 1, 9, 4], [1, 2, 13, 4], [2, 0, 17, 3]]


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
def test_chunked_projection_equals_dense_product(projection):
    sizes = (700, 33, 1291)  # ragged last chunks, and a leaf smaller than a chunk
    x = np.random.default_rng(0).normal(size=(3, sum(sizes))).astype(np.float32)
    got = jax.jit(partial(project, sizes=sizes, proj_dim=96, seed=5, chunk_size=256, projection=projection))(x)
    p = dense_matrix(sizes, 256, 96, 5, projection)
    if projection == "rademacher":
        assert set(np.unique(p * np.sqrt(96)).round(6)) == {-1.0, 1.0}
        assert abs((p > 0).mean() - 0.5) < 0.01  # 195k signs: sd 0.0011
    else:
        assert abs(p.std() * np.sqrt(96) - 1.0) < 0.01
    np.testing.assert_allclose(got, x @ p, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products_as_johnson_lindenstrauss_predicts(projection):
    """<Px, Py> is unbiased with the JL variance, and norms stay within a JL distortion bound.

    400 independent pairs (x, y) of unit vectors with correlations rho in [-0.9, 0.9]. For P with
    i.i.d. entries of variance 1/d: Var<Px, Py> = (|x|^2 |y|^2 + <x,y>^2 - c sum_k x_k^2 y_k^2) / d,
    c = 2 for Rademacher, 0 for Gaussian; given P, the errors of independent pairs are independent
    (tr(PP^T - I) is 0 for Rademacher, ~1e-3 for Gaussian), so the 400 standardized errors must
    have mean within 0.2 (4 sd) and sd within 0.15 of 1 (4 sd). Norms: P(| |Px|^2 - 1 | > eps) <=
    2 exp(-(eps^2/2 - eps^3/3) d / 2) per unit vector (Achlioptas 2003); eps = 0.25 and d = 1024
    give 3e-6, so all 800 vectors stay within 0.25 except with probability 3e-3.
    """
    d, n = 1024, 400
    sizes = (700, 1100, 300)
    rng = np.random.default_rng(1)
    rho = rng.uniform(-0.9, 0.9, n)[:, None]
    x = rng.normal(size=(n, sum(sizes)))
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=x.shape)
    both = np.concatenate([x, y])
    both = (both / np.linalg.norm(both, axis=1, keepdims=True)).astype(np.float32)
    proj = jax.jit(partial(project, sizes=sizes, proj_dim=d, seed=2, chunk_size=256, projection=projection))
    p_both = np.asarray(proj(both), np.float64)
    x, y, px, py = both[:n], both[n:], p_both[:n], p_both[n:]
    exact = np.sum(x * y, axis=1, dtype=np.float64)
    c = 2.0 if projection == "rademacher" else 0.0
    var = (1.0 + exact**2 - c * np.sum(x.astype(np.float64) ** 2 * y**2, axis=1)) / d
    z = (np.sum(px * py, axis=1) - exact) / np.sqrt(var)
    assert abs(z.mean()) < 0.2
    assert abs(z.std() - 1.0) < 0.15
    assert np.abs(np.sum(p_both**2, axis=1) - 1.0).max() < 0.25


def lora_leaf_sizes(layers: int, hidden: int) -> tuple[int, ...]:
    cfg = ModelConfig(**{**TINY, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 4 * hidden,
                         "head_dim": hidden // 4})
    abstract = nnx.eval_shape(lambda: add_lora(init_model(cfg), LoraSection(rank=8)))
    return tuple(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.LoRAParam)))


def test_projection_memory_does_not_grow_with_parameter_count():
    """XLA's memory analysis of the compiled projection: temporaries stay one block + accumulator.

    Two model sizes (LoRA of a 2-layer, 32-wide and a 16-layer, 512-wide model: 74x the trainable
    parameters). The dense product, compiled the same way, needs P x d floats of temporaries.
    """
    batch, d, chunk = 8, 1024, 2048
    small, large = lora_leaf_sizes(2, 32), lora_leaf_sizes(16, 512)
    assert sum(large) > 50 * sum(small)

    def temp_bytes(fn, sizes):
        shape = jax.ShapeDtypeStruct((batch, sum(sizes)), jnp.float32)
        return jax.jit(fn).lower(shape).compile().memory_analysis().temp_size_in_bytes

    def chunked(sizes):
        return partial(project, sizes=sizes, proj_dim=d, seed=0, chunk_size=chunk)

    def dense(sizes):
        return lambda x: x @ jax.random.rademacher(jax.random.key(0), (sum(sizes), d), jnp.float32)

    block = chunk * d * 4
    t_small, t_large = temp_bytes(chunked(small), small), temp_bytes(chunked(large), large)
    assert t_small == t_large
    assert t_large < 2 * block  # one [chunk, d] block plus small change
    assert temp_bytes(dense(large), large) >= sum(large) * d * 4 > 20 * t_large


# -- shards and resume ------------------------------------------------------------------------------


def fake_batches(n: int, size: int):
    """Batches carrying only what extract_features reads; the last has filler rows."""
    for start in range(0, n, size):
        index = np.arange(start, start + size)
        yield {"example_index": np.where(index < n, index, -1), "valid": (index < n).astype(np.float32)}


class CountingFeaturizer:
    """Features that are a known function of the example index; counts the rows it computed."""

    def __init__(self):
        self.rows = 0

    def __call__(self, batch):
        self.rows += len(batch["example_index"])
        i = np.asarray(batch["example_index"], np.float32)[:, None]
        return np.concatenate([i, -i, i * i], axis=1)


def test_extract_features_shards_resume_and_meta(tmp_path):
    meta = {"proj_dim": 3, "model": "abc"}
    f = CountingFeaturizer()
    extract_features(fake_batches(10, 4), f, out_dir=tmp_path, meta=meta, shard_size=4, progress=False)
    shards = sorted(p.name for p in tmp_path.glob("features-*.npz"))
    assert shards == ["features-00000.npz", "features-00001.npz", "features-00002.npz"]
    features, index = read_feature_shards(tmp_path)
    assert index.tolist() == list(range(10))
    np.testing.assert_array_equal(features[:, 2], np.arange(10) ** 2)
    assert f.rows == 12

    # Resume after losing the middle shard: only its batch is recomputed, into a new shard number.
    (tmp_path / "features-00001.npz").unlink()
    again = CountingFeaturizer()
    extract_features(fake_batches(10, 4), again, out_dir=tmp_path, meta=meta, shard_size=4, progress=False)
    assert again.rows == 4
    assert (tmp_path / "features-00003.npz").exists()
    features, index = read_feature_shards(tmp_path)
    assert index.tolist() == list(range(10)) and np.array_equal(features[:, 0], np.arange(10))

    with pytest.raises(ValueError, match="field 'model' is 'abc' but this run uses 'xyz'"):
        extract_features(fake_batches(10, 4), again, out_dir=tmp_path, meta={**meta, "model": "xyz"}, progress=False)


def test_read_feature_shards_rejects_repeated_examples(tmp_path):
    for k in range(2):
        np.savez(tmp_path / f"features-0000{k}.npz", features=np.zeros((2, 3), np.float32), example_index=np.array([k, 1]))
    with pytest.raises(ValueError, match="repeats example 1"):
        read_feature_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no feature shards"):
        read_feature_shards(tmp_path / "empty")
