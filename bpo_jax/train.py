"""The DPO trainer: a pure-functional, sharded train step plus the loop around it.

`train_step(state, batch) -> (state, metrics)` is one jitted function: the state (trainable
params, optimizer state, step, RNG) is donated and keeps the shardings the partition rules give
it, the batch arrives split over the mesh's data axes, and XLA inserts the collectives. The same
code runs on one CPU (a 1x1x1 mesh), one GPU, and multi-host TPU/GPU meshes.

Only the trainable part of the model is differentiated and updated: every `nnx.Param` for full
fine-tuning, only the `nnx.LoRAParam` adapters when LoRA is on (the frozen base is an argument of
the step, never copied). Reference log-probs come from one of four places (`reference`):
  precomputed  stored with the batch (`ref_chosen_logps` / `ref_rejected_logps`): no reference forward
  frozen_copy  a frozen copy of the initial trainable params (a full second copy without LoRA)
  lora_off     the policy with its adapters switched off: the base model, no second copy
  none         reference-free losses (simpo)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from bpo_jax.checkpointing import Checkpointer
from bpo_jax.config import OptimSection, TrainSection
from bpo_jax.data.batching import to_global_batch
from bpo_jax.data.packing import is_packed, pack_batch
from bpo_jax.distributed import host_packed_batch
from bpo_jax.losses import (
    chunked_sequence_logps,
    chunked_token_logps,
    dpo_metrics,
    loss_uses_mean_logps,
    packed_sequence_logps,
    packed_token_counts,
    preference_loss,
    sequence_logps,
    token_logps,
)
from bpo_jax.metrics import MetricsLogger
from bpo_jax.models.hf import _to_host as to_host
from bpo_jax.models.llama import CausalLM
from bpo_jax.models.lora import adapters_off_graphdef, has_lora
from bpo_jax.resumable import ResumeError
from bpo_jax.sharding import BATCH_AXES, batch_sharding, replicated, state_shardings

REFERENCE_MODES = ("precomputed", "frozen_copy", "lora_off", "none")


class TrainState(NamedTuple):
    """Everything a resumed run needs on device: a plain pytree, donated to each step."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trainable parameters only
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key, split once per step


def learning_rate_schedule(optim: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine or linear decay to 0 (or constant) at `total_steps`."""
    if optim.schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule {optim.schedule!r}; expected cosine, linear or constant")
    lr, warmup = optim.learning_rate, max(optim.warmup_steps, 0)
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) behind global-norm clipping."""
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )
    if optim.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.max_grad_norm), adamw), schedule
    return adamw, schedule


def trainable_filter(model: CausalLM):
    """LoRA adapters when the model has them, otherwise every parameter."""
    return nnx.LoRAParam if has_lora(model) else nnx.Param


def concatenated_logps(model: CausalLM, batch: dict[str, jax.Array], vocab_chunk: int = 0):
    """Chosen and rejected through the model in one forward: ((sum_c, sum_r), (mean_c, mean_r)).

    Takes a padded batch or a packed one (bpo_jax.data.packing); both give the same numbers.
    """
    if is_packed(batch):
        return _packed_logps(model, batch, vocab_chunk)
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]], axis=0)
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]], axis=0)
    if vocab_chunk > 0:
        hidden = model.hidden_states(ids, attention)
        sums, means, _ = chunked_sequence_logps(hidden, model.head_kernel(), ids, loss_mask, vocab_chunk=vocab_chunk)
    else:
        sums, means, _ = sequence_logps(model(ids, attention), ids, loss_mask)
    b = batch["chosen_input_ids"].shape[0]
    return (sums[:b], sums[b:]), (means[:b], means[b:])


def _packed_logps(model: CausalLM, batch: dict[str, jax.Array], vocab_chunk: int):
    """concatenated_logps of a packed batch: attention within segments, log-probs summed per segment."""
    ids, segments, positions = batch["input_ids"], batch["segment_ids"], batch["positions"]
    if vocab_chunk > 0:
        hidden = model.hidden_states(ids, positions=positions, segment_ids=segments)
        per_token = chunked_token_logps(hidden, model.head_kernel(), ids, vocab_chunk=vocab_chunk)
    else:
        per_token = token_logps(model(ids, positions=positions, segment_ids=segments), ids)
    num_sequences = 2 * batch["valid"].shape[0]
    sums, means, _ = packed_sequence_logps(per_token, batch["loss_mask"], segments, num_sequences)
    return (sums[0::2], sums[1::2]), (means[0::2], means[1::2])


def response_token_counts(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Scored tokens of each chosen and each rejected response (what mean log-probs divide by)."""
    if is_packed(batch):
        counts = packed_token_counts(batch["loss_mask"], batch["segment_ids"], 2 * batch["valid"].shape[0])
        return counts[0::2], counts[1::2]
    return batch["chosen_loss_mask"][:, 1:].sum(-1), batch["rejected_loss_mask"][:, 1:].sum(-1)


def _split_micro(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...], interleaved so every micro-batch keeps the batch's sharding."""
    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return {name: split(x) for name, x in batch.items()}


@dataclasses.dataclass
class Trainer:
    """Holds the static parts of training (graph, frozen params, optimizer) and the jitted step.

    Subclasses define the objective in `_micro_loss(trainable, frozen, reference_params, batch,
    n_valid_total) -> (loss, metric_sums)`: the loss already divided by the number of valid rows
    of the whole batch and the metrics as sums over valid rows, so micro-batches add up exactly.
    """

    model: CausalLM
    config: TrainSection
    mesh: Mesh
    total_steps: int

    def __post_init__(self) -> None:
        cfg = self.config
        if cfg.batch_size % cfg.grad_accum_steps:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by grad_accum_steps {cfg.grad_accum_steps}")
        self.graphdef, trainable, self.frozen = nnx.split(self.model, trainable_filter(self.model), ...)
        self.tx, self.schedule = make_optimizer(cfg.optim, self.total_steps)
        self._initial_trainable: nnx.State | None = trainable
        self.reference_params = None
        abstract = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=trainable,
            opt_state=jax.eval_shape(self.tx.init, trainable),
            rng=jax.eval_shape(jax.random.PRNGKey, 0),
        )
        self._state_shardings = self.state_shardings(abstract)
        # Pinned output shardings: without them XLA may hand back a differently sharded state
        # (e.g. norms split over fsdp), which breaks the partition rules and recompiles step 2.
        self._step = jax.jit(
            self._train_step_impl,
            donate_argnums=(0,),
            out_shardings=(self._state_shardings, replicated(self.mesh)),
        )

    # -- state ----------------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        """The step-0 state. The trainer owns the model's trainable arrays from here on: they are
        donated to the first step (no second copy in memory), so use `model_at(state)` afterwards."""
        if self._initial_trainable is None:
            raise RuntimeError("init_state() was already called: its params belong to the first state")
        params, self._initial_trainable = self._initial_trainable, None
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=jax.random.PRNGKey(0 if self.config.seed is None else self.config.seed),  # None: a TrainSection used outside a run
        )
        return jax.device_put(state, self._state_shardings)

    def state_shardings(self, state: TrainState) -> TrainState:
        shardings = state_shardings(state, self.mesh)
        return shardings._replace(step=replicated(self.mesh), rng=replicated(self.mesh))

    def model_at(self, state: TrainState) -> CausalLM:
        """The policy with the state's trainable params (for sampling/eval/export)."""
        return nnx.merge(self.graphdef, state.params, self.frozen)

    # -- the step -------------------------------------------------------------------------------
    def train_step(self, state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a global batch (host arrays or already-sharded jax.Arrays)."""
        batch = self._place(batch)
        return self._step(state, self.frozen, self.reference_params, batch)

    def lower_step(self, state: TrainState, batch: dict[str, Any]) -> jax.stages.Lowered:
        """The jitted step lowered for this state and batch shape: `.compile().memory_analysis()`
        or `.cost_analysis()` of it describe exactly the program `train_step` runs."""
        return self._step.lower(state, self.frozen, self.reference_params, self._place(batch))

    @property
    def pure_step(self):
        """The step as a pure function (state, frozen, reference_params, batch) -> (state, metrics),
        not jitted: what `train_step` jits, and what bpo_jax.arms vmaps over stacked arms."""
        return self._train_step_impl

    def _place(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """Split over the data axes (a no-op for arrays already placed so). Multi-host, a host batch
        holds this process's rows only (PreferenceBatcher(process_index=...)): the hosts' rows are
        joined into the global batch."""
        if jax.process_count() > 1 and not any(isinstance(v, jax.Array) for v in batch.values()):
            return to_global_batch(batch, self.mesh, P(BATCH_AXES))
        return {k: jax.device_put(v, batch_sharding(self.mesh, np.ndim(v))) for k, v in batch.items()}

    def tokens_in(self, batch: dict[str, Any]) -> int:
        """Real (attended) tokens the step processes: the throughput numerator."""
        return int(np.asarray(batch["chosen_attention_mask"]).sum() + np.asarray(batch["rejected_attention_mask"]).sum())

    def _micro_loss(self, trainable, frozen, reference_params, batch, n_valid_total):
        raise NotImplementedError

    def _train_step_impl(self, state: TrainState, frozen, reference_params, batch):
        k = self.config.grad_accum_steps
        n_valid_total = jnp.maximum(batch["valid"].sum(), 1.0)
        grad_fn = jax.grad(self._micro_loss, has_aux=True)
        if k == 1:
            grads, metric_sums = grad_fn(state.params, frozen, reference_params, batch, n_valid_total)
        else:
            micro_batches = _split_micro(batch, k)

            def accumulate(carry, micro):
                g, m = grad_fn(state.params, frozen, reference_params, micro, n_valid_total)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            first = jax.tree.map(lambda x: x[0], micro_batches)
            shapes = jax.eval_shape(grad_fn, state.params, frozen, reference_params, first, n_valid_total)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, metric_sums), _ = jax.lax.scan(accumulate, zeros, micro_batches)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        metrics = {name: v / n_valid_total for name, v in metric_sums.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = self.schedule(state.step)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics


@dataclasses.dataclass
class DPOTrainer(Trainer):
    """DPO-family preference optimization (see the module docstring for the reference modes)."""

    def __post_init__(self) -> None:
        cfg = self.config
        if cfg.reference not in REFERENCE_MODES:
            raise ValueError(f"unknown reference {cfg.reference!r}; expected one of {REFERENCE_MODES}")
        if cfg.reference == "lora_off" and not has_lora(self.model):
            raise ValueError("reference 'lora_off' needs a LoRA model (lora.rank > 0)")
        if cfg.reference == "none" and cfg.loss_type != "simpo":
            raise ValueError(f"reference 'none' only suits reference-free losses (simpo), not {cfg.loss_type!r}")
        super().__post_init__()
        self._reference_graphdef = adapters_off_graphdef(self.model) if cfg.reference == "lora_off" else self.graphdef
        if cfg.reference == "frozen_copy":
            # Its own copy of the initial trainable params (jnp.copy: new buffers, never donated).
            self.reference_params = jax.tree.map(jnp.copy, self._initial_trainable)

    def _place(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
        """With train.packing, pack the padded host batch first (one micro-batch per row group);
        multi-host, each host packs its own rows and the packed rows are joined across hosts."""
        if self.config.reference == "precomputed" and "ref_chosen_logps" not in batch:
            raise ValueError(
                "reference 'precomputed' needs batches with ref_chosen_logps/ref_rejected_logps "
                "(TokenizedPairs.with_ref_logps, e.g. from precompute_reference_logps)"
            )
        if self.config.packing and not is_packed(batch):
            shards = int(np.prod([self.mesh.shape[a] for a in BATCH_AXES])) // jax.process_count()
            batch = pack_batch(
                {k: np.asarray(v) for k, v in batch.items()},
                groups=self.config.grad_accum_steps,
                row_multiple=shards,
            )
            if jax.process_count() > 1:
                batch = host_packed_batch(batch, self.config.grad_accum_steps)
        return super()._place(batch)

    def _micro_loss(self, trainable, frozen, reference_params, batch, n_valid_total):
        cfg = self.config
        use_mean = loss_uses_mean_logps(cfg.loss_type)
        model = nnx.merge(self.graphdef, trainable, frozen)
        (pc, pr), (pc_mean, pr_mean) = concatenated_logps(model, batch, cfg.vocab_chunk)
        n_chosen, n_rejected = (jnp.maximum(n, 1) for n in response_token_counts(batch))
        if cfg.reference == "none":
            rc = rr = None
        else:
            if cfg.reference == "precomputed":
                rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                ref_trainable = reference_params if cfg.reference == "frozen_copy" else trainable
                ref_model = nnx.merge(self._reference_graphdef, jax.lax.stop_gradient(ref_trainable), frozen)
                (rc, rr), _ = concatenated_logps(ref_model, batch, cfg.vocab_chunk)
            rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
            if use_mean:
                rc, rr = rc / n_chosen, rr / n_rejected
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pc_mean if use_mean else pc,
            pr_mean if use_mean else pr,
            rc,
            rr,
            loss_type=cfg.loss_type,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            gamma=cfg.gamma,
        )
        valid = batch["valid"]
        n_valid = valid.sum()
        metrics = dpo_metrics(losses, chosen_rewards, rejected_rewards, pc, pr, valid)
        # Sums over valid rows, so micro-batches add up to the full batch exactly.
        metric_sums = {k: v * n_valid for k, v in metrics.items()}
        return (losses * valid).sum() / n_valid_total, metric_sums


@dataclasses.dataclass
class SFTTrainer(Trainer):
    """Supervised fine-tuning: mean token cross-entropy on the chosen responses of a DPO batch.

    Demonstrations travel in the DPO batch format (chosen = the demonstration) so SFT reuses the
    tokenization, batching, sharding and checkpointing of preference training unchanged.
    """

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(np.asarray(batch["chosen_attention_mask"]).sum())

    def _micro_loss(self, trainable, frozen, reference_params, batch, n_valid_total):
        model = nnx.merge(self.graphdef, trainable, frozen)
        ids, mask = batch["chosen_input_ids"], batch["chosen_loss_mask"]
        _, mean_logps, _ = sequence_logps(model(ids, batch["chosen_attention_mask"]), ids, mask)
        valid = batch["valid"]
        nll = -(mean_logps * valid).sum()
        return nll / n_valid_total, {"loss": jax.lax.stop_gradient(nll)}


def timed_steps(trainer: Trainer, state: TrainState, batches: Iterable[dict]) -> Iterable[tuple[TrainState, dict]]:
    """Run train steps over `batches`, adding step_time (s) and tokens_per_second to the metrics."""
    for batch in batches:
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - start
        metrics["step_time"] = elapsed
        metrics["tokens_per_second"] = trainer.tokens_in(batch) / elapsed
        yield state, metrics


SETTINGS_KEY = "train_settings"  # in a checkpoint's data item, beside the batcher position
# TrainSection fields that do not change what the steps compute: a resumed run may change them.
_FREE_ON_RESUME = ("checkpoint_every", "keep_checkpoints", "log_every")


def resume_settings(trainer: Trainer) -> dict[str, Any]:
    """What a checkpoint must have been made with to be continued: objective, optimizer, schedule."""
    cfg = {k: v for k, v in dataclasses.asdict(trainer.config).items() if k not in _FREE_ON_RESUME}
    return json.loads(json.dumps({"trainer": type(trainer).__name__, "total_steps": trainer.total_steps, **cfg}))


def check_resumable(saved: dict[str, Any], settings: dict[str, Any], directory: Path) -> None:
    """Refuse to continue checkpoints made with other training settings (checkpoints from before
    settings were saved carry none and are continued)."""
    changed = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ResumeError(f"{directory}: checkpoints made with other training settings ({details}); "
                          "restore them to resume, or move the directory away to start afresh")


def fit(
    trainer: Trainer,
    batches: Iterator[dict],
    *,
    run_dir: str | Path,
    num_steps: int,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    name: str = "train",
) -> TrainState:
    """Train for `num_steps` optimizer steps, resuming from run_dir/checkpoints if one exists.

    `batches` yields global batches; if it has get_state()/set_state() (as PreferenceBatcher
    does) its position is checkpointed with the train state, so a resumed run sees exactly the
    batches the uninterrupted run would have.
    """
    run_dir = Path(run_dir)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=keep_checkpoints)
    state = trainer.init_state()
    start = 0
    settings = resume_settings(trainer)
    if checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        check_resumable(data_state.pop(SETTINGS_KEY, settings), settings, checkpointer.directory)
        if hasattr(batches, "set_state"):
            batches.set_state(data_state)
        start = int(state.step)
        if jax.process_index() == 0:
            print(f"[{name}] resumed from the checkpoint at step {start} of {num_steps}", flush=True)
    logger = MetricsLogger(run_dir, start_step=start, total_steps=num_steps, name=name)
    step = start
    try:
        for state, metrics in timed_steps(trainer, state, itertools.islice(batches, num_steps - start)):
            step += 1
            logger.log(step, metrics)
            if step == num_steps or (checkpoint_every and step % checkpoint_every == 0):
                data_state = batches.get_state() if hasattr(batches, "get_state") else {}
                checkpointer.save(step, state, {**data_state, SETTINGS_KEY: settings})
    finally:
        checkpointer.close()
        logger.close()
    return state


@functools.partial(jax.jit, static_argnums=0, static_argnames="vocab_chunk")
def _summed_logps(graphdef, params, batch, vocab_chunk: int = 0):
    """(chosen, rejected) summed log-probs of a batch; module-level, so one compile serves every call."""
    (chosen, rejected), _ = concatenated_logps(nnx.merge(graphdef, params), batch, vocab_chunk)
    return chosen, rejected


def precompute_reference_logps(
    model: CausalLM, batches: Iterable[dict], mesh: Mesh, vocab_chunk: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed reference log-probs of every example: (example_index, chosen, rejected) arrays.

    Run once over the dataset with the reference policy; the batches then carry
    ref_chosen_logps / ref_rejected_logps and training (reference='precomputed') does no
    reference forward at all.
    """
    graphdef, params = nnx.split(model)
    logps = functools.partial(_summed_logps, graphdef, vocab_chunk=vocab_chunk)
    indices, chosen, rejected = [], [], []
    for batch in batches:
        placed = {
            k: jax.device_put(v, batch_sharding(mesh, np.ndim(v)))
            for k, v in batch.items()
            if k.endswith(("input_ids", "attention_mask", "loss_mask"))
        }
        c, r = (to_host(x) for x in logps(params, placed))
        keep = np.asarray(batch["valid"]) > 0
        indices.append(np.asarray(batch["example_index"])[keep])
        chosen.append(np.asarray(c)[keep])
        rejected.append(np.asarray(r)[keep])
    return np.concatenate(indices), np.concatenate(chosen), np.concatenate(rejected)
