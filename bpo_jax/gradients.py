"""Per-pair gradient features for BPO's dynamic depth: vmap(grad) + chunked random projection.

BPO (Wang et al., NAACL 2025), as we understand it, clusters preference pairs by the gradient each
one induces. The paper's body was not available to us: that reading and every operational
definition below are ours, not the paper's.

Feature of pair j (all choices configurable):
  1. g_j = d loss_j / d theta_S: the gradient of the DPO-family loss of pair j *alone* with
     respect to a trainable subset S: the LoRA adapters (`trainable="lora"`, every nnx.LoRAParam)
     or every nnx.Param whose "/"-joined path ("layers/0/mlp/down_proj/kernel") matches a regex.
     Reference log-probs come from the batch's precomputed `ref_chosen_logps` /
     `ref_rejected_logps` (summed; divided by the response length for ipo/simpo as in training);
     when the batch has none they are taken as 0 ("zero reference": h = logp_c - logp_r, the
     reference-free gradient direction). simpo ignores the reference. All pairs of a micro-batch
     are differentiated at once with `jax.vmap(jax.grad(loss))` inside one jitted function.
  2. Optional Adam preconditioning (LESS-style, Xia et al. 2024) from a warm-up optimizer state
     (mu, nu, count): the update direction Adam would take if this pair were the next batch,
        t = count + 1,  m = b1 mu + (1-b1) g,  v = b2 nu + (1-b2) g^2,
        g' = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
     (LESS's released code omits the bias corrections and puts eps inside the sqrt; we use the
     textbook Adam step.)
  3. Random projection to d dims with entries +-1/sqrt(d) (Rademacher) or N(0, 1/d) (Gaussian),
     never materialized: the trainable leaves are visited in `jax.tree.leaves` order (leaf index
     l), each leaf's flattened gradient (n_l entries) is cut into chunks of `chunk_size` rows, and
     chunk c of leaf l multiplies the [chunk_size, d] block generated from
        key = fold_in(fold_in(key(seed), l), c).
     Rows of a block past the end of its leaf are unused (the same as zero-padding each leaf to
     whole chunks). A Rademacher block takes its signs from packed random bits, 32 per word:
     entry (i, k) is bit (k mod 32) of word (i, k // 32) of jax.random.bits(key, [chunk_size,
     ceil(d/32)], uint32), 1 -> +, 0 -> - (a tenth of the cost of one random word per entry).
     Working memory is one block plus the [batch, d] accumulator, whatever the parameter count.
     E[<Px, Py>] = <x, y> (Johnson-Lindenstrauss).
  4. L2 normalization (an all-zero gradient stays zero).

Note: a fresh LoRA adapter has B = 0, so every dL/dA is exactly 0 and the features only see B's
gradient. Run a short DPO warm-up (which also yields the Adam state for step 2) before extracting.

Features are stored as .npz shards (features [n, d] float32, example_index [n] int64) beside a
features_meta.json naming the settings; `extract_features` resumes by skipping batches whose
examples are already in a shard.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from bpo_jax.distributed import barrier
from bpo_jax.io_utils import atomic_open, write_json
from bpo_jax.losses import loss_uses_mean_logps, preference_loss
from bpo_jax.models.llama import CausalLM
from bpo_jax.sharding import BATCH_AXES
from bpo_jax.train import concatenated_logps

PROJECTIONS = ("rademacher", "gaussian")
SEQUENCE_FIELDS = tuple(
    f"{side}_{name}" for side in ("chosen", "rejected") for name in ("input_ids", "attention_mask", "loss_mask")
)
REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
META_FILE = "features_meta.json"
SHARD_PATTERN = "features-*.npz"


# -- trainable subset ---------------------------------------------------------------------------


def path_string(path: Sequence[Any]) -> str:
    """'layers/0/self_attn/q_proj/lora_a' for a tree path of nnx.State or optax state keys."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        if key != "value":  # the Variable's own attribute, not part of the parameter's name
            parts.append(str(key))
    return "/".join(parts)


def subset_filter(trainable: str) -> Any:
    """An nnx filter: 'lora' -> nnx.LoRAParam; anything else is a regex searched in each
    nnx.Param's "/"-joined path."""
    if trainable == "lora":
        return nnx.LoRAParam
    try:
        pattern = re.compile(trainable)
    except re.error as exc:
        raise ValueError(f"trainable {trainable!r} is neither 'lora' nor a valid regex: {exc}") from None

    def matches(path, value) -> bool:
        return isinstance(value, nnx.Param) and pattern.search("/".join(str(p) for p in path)) is not None

    return matches


# -- Adam preconditioning ---------------------------------------------------------------------


class AdamMoments(NamedTuple):
    """First/second moments by parameter path, the steps taken, and Adam's hyper-parameters."""

    mu: dict[str, jax.Array]
    nu: dict[str, jax.Array]
    count: int
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def adam_moments(opt_state: Any, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> AdamMoments:
    """Find optax's ScaleByAdamState inside an optimizer state (e.g. TrainState.opt_state of
    optax.chain(clip, adamw)) and key its moments by parameter path."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected exactly one Adam state (optax.ScaleByAdamState) in opt_state; found {len(found)}")
    (state,) = found

    def by_path(tree) -> dict[str, jax.Array]:
        return {path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    return AdamMoments(by_path(state.mu), by_path(state.nu), int(state.count), b1, b2, eps)


def adam_precondition(grad: jax.Array, mu: jax.Array, nu: jax.Array, count, b1: float, b2: float, eps: float):
    """The Adam step direction with `grad` as the next gradient (module docstring, step 2)."""
    t = jnp.asarray(count, jnp.float32) + 1.0
    m = b1 * mu + (1.0 - b1) * grad
    v = b2 * nu + (1.0 - b2) * grad * grad
    m_hat = m / (1.0 - b1**t)
    v_hat = v / (1.0 - b2**t)
    return m_hat / (jnp.sqrt(v_hat) + eps)


# -- chunked random projection ----------------------------------------------------------------


def projection_block(seed: int, leaf: int, chunk: int, chunk_size: int, proj_dim: int, projection: str) -> jax.Array:
    """Rows [chunk*chunk_size, (chunk+1)*chunk_size) of leaf `leaf`'s projection matrix."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), leaf), chunk)
    return _sample_block(key, chunk_size, proj_dim, projection)


def _sample_block(key: jax.Array, rows: int, proj_dim: int, projection: str) -> jax.Array:
    scale = 1.0 / np.sqrt(proj_dim)
    if projection == "rademacher":
        words = jax.random.bits(key, (rows, -(-proj_dim // 32)), jnp.uint32)
        bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        signs = bits.reshape(rows, -1)[:, :proj_dim].astype(jnp.float32) * 2.0 - 1.0
        return signs * scale
    if projection == "gaussian":
        return jax.random.normal(key, (rows, proj_dim), jnp.float32) * scale
    raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")


def chunk_table(sizes: Sequence[int], chunk_size: int) -> np.ndarray:
    """One row (leaf, chunk, start in the flat vector, rows used) per block: [num_blocks, 4] int32."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.ndim != 1 or sizes.size == 0 or (sizes <= 0).any():
        raise ValueError(f"leaf sizes must be a non-empty list of positive ints; got {sizes.tolist()}")
    n_chunks = -(-sizes // chunk_size)
    leaf = np.repeat(np.arange(sizes.size), n_chunks)
    first = np.cumsum(n_chunks) - n_chunks
    chunk = np.arange(leaf.size) - first[leaf]
    offsets = np.cumsum(sizes) - sizes
    start = offsets[leaf] + chunk * chunk_size
    used = np.minimum(chunk_size, sizes[leaf] - chunk * chunk_size)
    return np.stack([leaf, chunk, start, used], axis=1).astype(np.int32)


def project(
    flat: jax.Array,
    sizes: Sequence[int],
    *,
    proj_dim: int,
    seed: int,
    chunk_size: int,
    projection: str = "rademacher",
) -> jax.Array:
    """flat @ P for flat [batch, sum(sizes)], the leaves' gradients concatenated in leaf order.

    Traceable (call it under jit). One fori_loop over every (leaf, chunk) block: each iteration
    generates one [chunk_size, proj_dim] block and multiplies the matching [batch, chunk_size]
    slice of `flat`; entries past the leaf's end are masked to zero (zero padding). A slice that
    would run past the end of `flat` is taken ending at the end and rolled into place, so `flat`
    itself is never padded or copied.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")
    table = jnp.asarray(chunk_table(sizes, chunk_size))
    batch, total = flat.shape
    if total != sum(sizes):
        raise ValueError(f"flat has {total} columns but the leaf sizes add up to {sum(sizes)}")
    if total < chunk_size:  # a whole trainable set smaller than one chunk: pad it (tiny)
        flat = jnp.pad(flat, ((0, 0), (0, chunk_size - total)))
        total = chunk_size
    rows = jnp.arange(chunk_size)

    def body(i, acc):
        leaf, chunk, start, used = table[i, 0], table[i, 1], table[i, 2], table[i, 3]
        block = projection_block(seed, leaf, chunk, chunk_size, proj_dim, projection)
        begin = jnp.minimum(start, total - chunk_size)
        piece = jax.lax.dynamic_slice_in_dim(flat, begin, chunk_size, axis=1).astype(jnp.float32)
        piece = jnp.roll(piece, begin - start, axis=1)
        piece = jnp.where(rows < used, piece, 0.0)
        return acc + piece @ block

    return jax.lax.fori_loop(0, table.shape[0], body, jnp.zeros((batch, proj_dim), jnp.float32))


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit norm; an all-zero row stays zero."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norm > 0, norm, 1.0)


# -- per-pair gradients -----------------------------------------------------------------------


def pair_loss(trainable, frozen, example, *, graphdef, loss_type, beta, label_smoothing, gamma, vocab_chunk) -> jax.Array:
    """The DPO-family loss of one pair (fields without the batch axis), as DPOTrainer computes it;
    without ref_chosen_logps / ref_rejected_logps in `example` the reference log-probs are 0."""
    batch = {k: v[None] for k, v in example.items()}
    model = nnx.merge(graphdef, trainable, frozen)
    (pc, pr), (pc_mean, pr_mean) = concatenated_logps(model, batch, vocab_chunk)
    use_mean = loss_uses_mean_logps(loss_type)
    rc = rr = None
    if loss_type != "simpo":
        rc = batch.get("ref_chosen_logps", jnp.zeros((1,), jnp.float32))
        rr = batch.get("ref_rejected_logps", jnp.zeros((1,), jnp.float32))
        if use_mean:
            rc = rc / jnp.maximum(batch["chosen_loss_mask"][:, 1:].sum(-1), 1)
            rr = rr / jnp.maximum(batch["rejected_loss_mask"][:, 1:].sum(-1), 1)
    losses, _, _ = preference_loss(
        pc_mean if use_mean else pc,
        pr_mean if use_mean else pr,
        rc,
        rr,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        gamma=gamma,
    )
    return losses[0]


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """Everything that changes the features (recorded in features_meta.json)."""

    proj_dim: int = 8192
    seed: int = 0
    trainable: str = "lora"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    chunk_size: int = 2048
    projection: str = "rademacher"
    vocab_chunk: int = 0

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {self.projection!r}; expected one of {PROJECTIONS}")
        for name in ("proj_dim", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")


@partial(jax.jit, static_argnames=("graphdef", "settings", "leaf_sizes"))
def _features(trainable, frozen, adam, batch, *, graphdef, settings: FeatureSettings, leaf_sizes: tuple[int, ...]):
    """Features of a batch shaped [micro-batches, micro_batch, ...]: per-pair gradients one
    micro-batch at a time, then one projection of all rows (its blocks generated once per call).
    Module-level, so every featurizer of the same model graph and settings shares one compilation."""
    s = settings
    loss = partial(
        pair_loss,
        graphdef=graphdef,
        loss_type=s.loss_type,
        beta=s.beta,
        label_smoothing=s.label_smoothing,
        gamma=s.gamma,
        vocab_chunk=s.vocab_chunk,
    )
    per_pair_grad = jax.vmap(jax.grad(loss), in_axes=(None, None, 0))

    def micro(examples):
        grads = jax.tree.leaves(per_pair_grad(trainable, frozen, examples))
        return jnp.concatenate([g.reshape(g.shape[0], -1).astype(jnp.float32) for g in grads], axis=1)

    flat = jax.lax.map(micro, batch)
    flat = flat.reshape(-1, flat.shape[-1])
    if adam is not None:
        mu, nu, count, (b1, b2, eps) = adam
        flat = adam_precondition(flat, mu[None], nu[None], count, b1, b2, eps)
    projected = project(flat, leaf_sizes, proj_dim=s.proj_dim, seed=s.seed, chunk_size=s.chunk_size, projection=s.projection)
    return l2_normalize(projected)


class GradientFeaturizer:
    """Compiles the feature function once for a model and settings; call it on DPO batches.

    `micro_batch` (0: the whole batch) bounds how many pairs are differentiated at once (their
    activations live together). The gradients of all rows of a call, [rows, P] floats, are then
    projected together: the projection blocks are generated once per call, so larger calls
    amortize them (`rows_per_call` suggests a size). With a `mesh`, each micro-batch is split over
    its data axes (data x fsdp must divide it).
    """

    def __init__(
        self,
        model: CausalLM,
        settings: FeatureSettings = FeatureSettings(),
        *,
        adam_state: AdamMoments | None = None,
        micro_batch: int = 0,
        mesh: Mesh | None = None,
    ):
        self.settings = settings
        self.micro_batch = micro_batch
        self.mesh = mesh
        self.graphdef, self.trainable, self.frozen = nnx.split(model, subset_filter(settings.trainable), ...)
        flat = jax.tree_util.tree_flatten_with_path(self.trainable)[0]
        if not flat:
            raise ValueError(
                f"trainable {settings.trainable!r} selects no parameter of the model"
                + (" (the model has no LoRA adapters: call add_lora first)" if settings.trainable == "lora" else "")
            )
        self.leaf_paths = [path_string(p) for p, _ in flat]
        self.leaf_sizes = tuple(int(x.size) for _, x in flat)
        self.num_params = sum(self.leaf_sizes)
        self.adam = None if adam_state is None else self._align_adam(adam_state)

    def rows_per_call(self, examples: int, memory_bytes: int = 1 << 30, max_rows: int = 1024) -> int:
        """A batch size for calls over `examples` pairs: whole micro-batches whose float32 gradients,
        held twice (raw and preconditioned), fit in `memory_bytes`; at least one micro-batch, at
        most max_rows, and no more micro-batches than the examples fill."""
        mb = max(self.micro_batch, 1)
        fits = min(memory_bytes // (8 * self.num_params), max_rows, -(-examples // mb) * mb)
        return max(mb, fits // mb * mb)

    def _align_adam(self, adam: AdamMoments):
        """The moments flattened and concatenated in leaf order (a missing path is an error)."""
        flat = []
        for name, table in (("mu", adam.mu), ("nu", adam.nu)):
            missing = [p for p in self.leaf_paths if p not in table]
            if missing:
                raise ValueError(
                    f"Adam state has no {name} for trainable parameter(s) {missing[:3]}: extract features with "
                    "the trainable subset the warm-up optimized"
                )
            flat.append(jnp.concatenate([jnp.ravel(jnp.asarray(table[p], jnp.float32)) for p in self.leaf_paths]))
        return flat[0], flat[1], jnp.asarray(adam.count, jnp.float32), (adam.b1, adam.b2, adam.eps)

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        """Unit-norm features [B, proj_dim] for every row of a DPO batch (padding rows included)."""
        fields = SEQUENCE_FIELDS + tuple(f for f in REFERENCE_FIELDS if f in batch)
        missing = [f for f in SEQUENCE_FIELDS if f not in batch]
        if missing:
            raise ValueError(f"DPO batch lacks field(s) {missing}")
        if (REFERENCE_FIELDS[0] in batch) != (REFERENCE_FIELDS[1] in batch):
            raise ValueError(f"DPO batch must have both or neither of {REFERENCE_FIELDS}")
        rows = np.shape(batch[SEQUENCE_FIELDS[0]])[0]
        mb = self.micro_batch if 0 < self.micro_batch < rows else rows
        padded = -(-rows // mb) * mb
        arrays = {}
        for f in fields:
            x = np.asarray(batch[f])
            if padded > rows:  # repeat the last row; its features are dropped below
                x = np.concatenate([x, np.repeat(x[-1:], padded - rows, axis=0)])
            arrays[f] = x.reshape((padded // mb, mb) + x.shape[1:])
        if self.mesh is not None:
            arrays = {
                f: jax.device_put(x, NamedSharding(self.mesh, P(None, BATCH_AXES, *([None] * (x.ndim - 2)))))
                for f, x in arrays.items()
            }
        out = _features(
            self.trainable, self.frozen, self.adam, arrays,
            graphdef=self.graphdef, settings=self.settings, leaf_sizes=self.leaf_sizes,
        )
        return np.asarray(out)[:rows]


def pair_gradient_features(
    model: CausalLM,
    batch: dict[str, Any],
    *,
    adam_state: AdamMoments | None = None,
    micro_batch: int = 0,
    **settings: Any,
) -> np.ndarray:
    """Unit-norm projected per-pair gradient features [B, proj_dim] of one DPO batch.

    `settings` are FeatureSettings fields (proj_dim, seed, trainable, loss_type, ...). One-off
    convenience: build a `GradientFeaturizer` to reuse the compiled function across batches.
    """
    featurizer = GradientFeaturizer(model, FeatureSettings(**settings), adam_state=adam_state, micro_batch=micro_batch)
    return featurizer(batch)


# -- feature shards ---------------------------------------------------------------------------


def _shard_path(out_dir: Path, number: int) -> Path:
    return out_dir / f"features-{number:05d}.npz"


def _save_shard(path: Path, features: np.ndarray, example_index: np.ndarray) -> None:
    with atomic_open(path, "wb", every_process=True) as f:  # each process writes its own shards
        np.savez(f, features=np.asarray(features, np.float32), example_index=np.asarray(example_index, np.int64))


def read_feature_shards(out_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All shards of a directory: (features [n, d] float32, example_index [n]), sorted by example_index."""
    out_dir = Path(out_dir)
    paths = sorted(out_dir.glob(SHARD_PATTERN))
    if not paths:
        raise FileNotFoundError(f"no feature shards ({SHARD_PATTERN}) in {out_dir}")
    features, indices = [], []
    for path in paths:
        with np.load(path) as shard:
            for field in ("features", "example_index"):
                if field not in shard:
                    raise ValueError(f"{path}: feature shard lacks field {field!r}")
            f, idx = shard["features"], shard["example_index"]
        if f.ndim != 2 or idx.shape != (f.shape[0],) or (features and f.shape[1] != features[0].shape[1]):
            want = features[0].shape[1] if features else "d"
            raise ValueError(
                f"{path}: field 'features' has shape {f.shape} with example_index {idx.shape}; expected [n, {want}], [n]"
            )
        features.append(f)
        indices.append(idx)
    features, indices = np.concatenate(features), np.concatenate(indices)
    order = np.argsort(indices, kind="stable")
    features, indices = features[order], indices[order]
    dup = np.flatnonzero(indices[1:] == indices[:-1])
    if dup.size:
        raise ValueError(f"{out_dir}: field 'example_index' repeats example {int(indices[dup[0]])} across shards")
    return features, indices


def _check_meta(out_dir: Path, meta: dict) -> None:
    """Refuse to resume into a directory written with other settings."""
    path = out_dir / META_FILE
    if not path.exists():
        write_json(path, meta)
        return
    old = json.loads(path.read_text())
    for field in sorted(set(old) | set(meta)):
        if old.get(field) != meta.get(field):
            raise ValueError(
                f"{path}: field {field!r} is {old.get(field)!r} but this run uses {meta.get(field)!r}; "
                "use another out_dir or delete the old features"
            )


def extract_features(
    batches: Iterable[dict[str, Any]],
    featurizer: Callable[[dict], np.ndarray],
    *,
    out_dir: str | Path,
    meta: dict[str, Any],
    shard_size: int = 4096,
    total: int | None = None,
    progress: bool = True,
) -> Path:
    """Features of every valid row of `batches` into shards of out_dir, resuming a partial run.

    `featurizer` maps a DPO batch to features (a GradientFeaturizer); `meta` (JSON) names whatever
    determines them (settings, model, data) and must match the directory's features_meta.json.
    Examples already in a shard are not recomputed (a batch whose valid rows are all done is
    skipped without running the model); a shard is written once >= `shard_size` new rows have
    accumulated, at a batch boundary. Returns out_dir; read the result with read_feature_shards.
    Multi-host: collective; each process passes the batches of its share and all return once
    every process's shards are written.
    """
    out_dir = Path(out_dir)
    _check_meta(out_dir, json.loads(json.dumps(meta)))  # as it reads back (tuples become lists)
    existing = sorted(out_dir.glob(SHARD_PATTERN))
    done = read_feature_shards(out_dir)[1] if existing else np.zeros(0, np.int64)
    # Multi-host: each process extracts its share of the examples; its shard numbers are its own
    # residue class mod the process count, above every number taken, so no two processes collide.
    last, count = max((int(p.stem.split("-")[1]) for p in existing), default=-1), jax.process_count()
    next_shard = last + 1 + (jax.process_index() - last - 1) % count
    pending_f: list[np.ndarray] = []
    pending_i: list[np.ndarray] = []
    pending_rows = 0
    bar = tqdm(batches, total=total, desc="gradient features", unit="batch", disable=not progress)
    for batch in bar:
        index = np.asarray(batch["example_index"]).astype(np.int64)
        keep = (np.asarray(batch["valid"]) > 0) & ~np.isin(index, done)
        if not keep.any():
            continue
        pending_f.append(featurizer(batch)[keep])
        pending_i.append(index[keep])
        pending_rows += int(keep.sum())
        if pending_rows >= shard_size:
            _save_shard(_shard_path(out_dir, next_shard), np.concatenate(pending_f), np.concatenate(pending_i))
            next_shard, pending_f, pending_i, pending_rows = next_shard + count, [], [], 0
    if pending_rows:
        _save_shard(_shard_path(out_dir, next_shard), np.concatenate(pending_f), np.concatenate(pending_i))
    barrier(f"{out_dir} shards written")
    return out_dir
