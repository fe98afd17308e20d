"""On-policy sampling: n responses per prompt, decoded with a preallocated KV cache under one jit.

Layout of a decode batch (rows = prompts x samples, padded up to a multiple of the data shards):
cache slots [0, P) hold the prompts left-padded to a length bucket P, so every row's last prompt
token sits at slot P-1 and generated token t of every row goes to slot P+t; the cache has
P + max_new_tokens slots. Positions count real tokens only, so padding never shifts a row's
rotary phases and a row decodes exactly as it would alone.

Randomness: step t of sample j of the prompt with global index i draws from
fold_in(fold_in(fold_in(key(seed), i), j), t). The global index is the prompt's row in the prompts
file, so outputs do not depend on the batch size, the batch order, the mesh, or on resuming.

The sampling distribution follows Hugging Face's warper order: logits / temperature, then top-k,
then top-p (nucleus: the smallest set of most likely tokens whose probability reaches top_p,
computed after top-k, always containing the top token), renormalized. temperature = 0 is greedy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from bpo_jax.data.batching import pad_and_stack
from bpo_jax.data.readers import iter_records
from bpo_jax.data.schema import DataError, PromptRecord
from bpo_jax.data.tokenize import RaggedTokens, encode_prompts, render_prompt
from bpo_jax.distributed import local_mesh, local_model, share
from bpo_jax.models.hf import _to_host as to_host
from bpo_jax.models.llama import CausalLM, default_positions
from bpo_jax.resumable import ResumableJsonl, check_unique_ids
from bpo_jax.sharding import batch_sharding, make_mesh, state_shardings
from bpo_jax.stacking import ArmWeights, over_arms, resolve
from bpo_jax.tokenizer import Tokenizer

MIN_BUCKET = 16


class SamplingConfigError(ValueError):
    """An invalid sampling setting; the message names the field."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    n: int = 4  # responses per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1: off
    top_k: int = 0  # keep the k most likely tokens; 0: off
    max_new_tokens: int = 256
    max_prompt_length: int = 0  # > 0: longer prompts keep their last tokens; 0: no limit
    batch_size: int = 8  # prompts per decode batch (rows = batch_size * n, rounded up to the data shards)
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # stop tokens in addition to the model's (and tokenizer's) EOS
    min_new_tokens: int = 0  # stop tokens are excluded before this many tokens (1: no empty responses)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        checks = {
            "n": self.n >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
            "max_prompt_length": self.max_prompt_length >= 0,
            "batch_size": self.batch_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise SamplingConfigError(f"sampling.{name}: invalid value {getattr(self, name)!r}")


@dataclasses.dataclass
class GenerationResult:
    """tokens[i][j]: the j-th response to prompt i, ending with its stop token when finished[i, j]."""

    tokens: list[list[list[int]]]
    finished: np.ndarray  # bool [prompts, n]: ended with a stop token (not truncated)
    num_tokens: np.ndarray  # int [prompts, n]: generated tokens, stop token included


# -- the sampling distribution (pure) ------------------------------------------------------------
def sampling_logprobs(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Log-probs [..., V] of the distribution tokens are drawn from; -inf marks excluded tokens.

    Tokens tied with the last kept value are kept too (as Hugging Face's warpers do).
    """
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy decoding, not a distribution")
    x = logits.astype(jnp.float32) / temperature
    candidates = x  # the tokens the nucleus is looked for in
    if 0 < top_k < x.shape[-1]:
        # The barrier keeps XLA's CPU backend from rewriting top_k into a sort of the whole
        # vocabulary (~100x slower at V = 32k, per decode step).
        candidates = jax.lax.optimization_barrier(jax.lax.top_k(x, top_k)[0])
        x = jnp.where(x >= candidates[..., -1:], x, -jnp.inf)
    if top_p < 1.0:
        probs = jnp.exp(candidates - jax.nn.logsumexp(x, axis=-1, keepdims=True))
        cutoff = _cutoff_key(_order_keys(candidates), probs, top_p)
        x = jnp.where(_order_keys(x) >= cutoff, x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values of x are (sign bit flipped, negatives inverted)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _cutoff_key(keys: jax.Array, probs: jax.Array, top_p: float) -> jax.Array:
    """Per row, the smallest candidate key whose strictly larger candidates hold < top_p of the mass.

    Keeping the tokens with keys >= the cutoff keeps the nucleus, ties included: the smallest
    set of most likely tokens whose mass reaches top_p. Found by bisection over the 32-bit key
    space (32 passes of compare-and-sum) rather than by sorting, which on CPU costs ~100x more
    for a whole vocabulary.
    """
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1  # below every candidate: never the answer
    hi = jnp.max(keys, axis=-1, keepdims=True)  # no candidate above it: mass 0 < top_p

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        light = jnp.sum(jnp.where(keys > mid, probs, 0), axis=-1, keepdims=True) < top_p
        return jnp.where(light, lo, mid), jnp.where(light, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """One token per row of logits [B, V] with its own key (keys [B]); argmax when temperature is 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jnp.exp(sampling_logprobs(logits, temperature, top_k, top_p))
    return inverse_cdf_sample(probs, jax.vmap(jax.random.uniform)(keys))


_CDF_BLOCK = 256


def inverse_cdf_sample(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Per row of probs [B, V] (>= 0), the index i with cdf[i-1] <= u * total < cdf[i] (u [B] in [0, 1)).

    Exact categorical sampling from one uniform number per row. The cumulative sum runs over
    blocks of the vocabulary, then inside the chosen block: O(V) work, where Gumbel-max draws V
    random numbers and takes two logs of each (on CPU, more than the decode step's forward at
    V = 32k). A token of probability 0 is never returned, whatever the rounding.
    """
    b, v = probs.shape
    blocks = jnp.pad(probs, ((0, 0), (0, -v % _CDF_BLOCK))).reshape(b, -1, _CDF_BLOCK)
    block_mass = blocks.sum(axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = u * block_cdf[:, -1]
    j = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_true(block_mass > 0))
    before = jnp.where(j > 0, jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    inside = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]
    k = jnp.sum(jnp.cumsum(inside, axis=-1) <= (target - before)[:, None], axis=-1)
    k = jnp.minimum(k, _last_true(inside > 0))
    return (j * _CDF_BLOCK + k).astype(jnp.int32)


def _last_true(mask: jax.Array) -> jax.Array:
    """Index of the last True along the last axis (rows are assumed to have one)."""
    return mask.shape[-1] - 1 - jnp.argmax(mask[..., ::-1], axis=-1)


# -- one jitted decode batch ---------------------------------------------------------------------
class DecodeSpec(NamedTuple):
    """Static settings of the compiled decode loop (one compilation per spec and batch shape)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_ids: tuple[int, ...]
    min_new_tokens: int = 0  # reaches the loop as a traced value: changing it does not recompile
    pad_id: int = 0
    return_logits: bool = False  # keep every step's logits [B, max_new_tokens, V] (tests, analysis)
    cache_sharding: NamedSharding | None = None


class DecodeOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, max_new_tokens], pad_id after a row's stop token
    lengths: jax.Array  # int32 [B], stop token included
    finished: jax.Array  # bool [B]
    logits: jax.Array | None  # float32 [B, max_new_tokens, V] when spec.return_logits


def _decode(graphdef, state, ids, mask, prompt_index, sample_index, valid, seed, min_new_tokens, spec: DecodeSpec) -> DecodeOutput:
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    m = spec.max_new_tokens
    cache = model.init_cache(b, p + m)
    if spec.cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, spec.cache_sharding)
    # Slots past the prompt are marked real from the start: causality already hides future slots,
    # and rows that stopped produce outputs nobody reads.
    cache_mask = jnp.concatenate([mask, jnp.ones((b, m), mask.dtype)], axis=1)
    prompt_len = jnp.sum(mask, axis=1).astype(jnp.int32)
    base = jax.random.key(seed)
    row_keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))(prompt_index, sample_index)
    stop = jnp.asarray(spec.stop_ids or (-1,), jnp.int32)

    def emit(t, step_logits, carry):
        tokens, lengths, finished, done, logits_buf = carry
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
        allowed = jnp.where(t < min_new_tokens, jnp.where(stops_vocab, -jnp.inf, step_logits), step_logits)
        tok = sample_tokens(allowed, keys, spec.temperature, spec.top_k, spec.top_p)
        tok = jnp.where(done, spec.pad_id, tok)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
        stopped = ~done & jnp.isin(tok, stop)
        if logits_buf is not None:
            logits_buf = jax.lax.dynamic_update_slice(logits_buf, step_logits[:, None].astype(jnp.float32), (0, t, 0))
        return tok, (tokens, lengths + (~done).astype(jnp.int32), finished | stopped, done | stopped, logits_buf)

    logits, cache = model.forward_with_cache(ids, default_positions(mask), cache_mask, cache, jnp.int32(0))
    vocab = logits.shape[-1]
    stops_vocab = jnp.isin(jnp.arange(vocab), stop)
    init = (
        jnp.full((b, m), spec.pad_id, jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b,), bool),
        ~valid,
        jnp.zeros((b, m, vocab), jnp.float32) if spec.return_logits else None,
    )
    tok, carry = emit(jnp.int32(0), logits[:, -1], init)

    def cond(loop):
        t, _, _, carry = loop
        return (t < m) & ~jnp.all(carry[3])

    def body(loop):
        t, tok, cache, carry = loop
        slot = p + t - 1  # where the previous token goes
        step_logits, cache = model.forward_with_cache(tok[:, None], (prompt_len + t - 1)[:, None], cache_mask, cache, slot)
        tok, carry = emit(t, step_logits[:, 0], carry)
        return t + 1, tok, cache, carry

    _, _, _, (tokens, lengths, finished, _, logits_buf) = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, carry))
    return DecodeOutput(tokens, lengths, finished, logits_buf)


_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "spec"))


def _decode_arms(graphdef, params, frozen, *args, spec: DecodeSpec, mode: str) -> DecodeOutput:
    """`_decode` of every arm (bpo_jax.stacking: vmap or a loop over arms), as one program."""

    def one_arm(arm_params):
        arm_graphdef, state = nnx.split(nnx.merge(graphdef, arm_params, frozen))
        return _decode(arm_graphdef, state, *args, spec=spec)

    return over_arms(one_arm, mode)(params)


_decode_arms_jit = jax.jit(_decode_arms, static_argnames=("graphdef", "spec", "mode"))


def decode_batch(
    model: CausalLM,
    ids: np.ndarray,
    mask: np.ndarray,
    prompt_index: np.ndarray,
    sample_index: np.ndarray,
    valid: np.ndarray,
    seed: int,
    spec: DecodeSpec,
    mesh: Mesh,
    arms: ArmWeights | None = None,
) -> DecodeOutput:
    """Decode one left-padded batch (ids/mask int32 [B, P]) on `mesh`; results as host arrays.

    Rows with valid = False are filler: they start finished and return no tokens. With `arms`,
    every arm decodes the same rows with the same keys in one program, and each output
    gains a leading arm axis (`model` then only supplies the configuration).
    """
    arrays = [(ids, np.int32), (mask, np.int32), (prompt_index, np.int32), (sample_index, np.int32), (valid, bool)]
    placed = [to_global(np.asarray(a, dtype), batch_sharding(mesh, np.ndim(a))) for a, dtype in arrays]
    static = spec._replace(min_new_tokens=0)
    dynamic = (*placed, np.uint32(seed), np.int32(spec.min_new_tokens))
    if arms is None:
        graphdef, state = nnx.split(model)
        out = _decode_jit(graphdef, params_on_mesh(state, mesh), *dynamic, spec=static)
    else:
        out = _decode_arms_jit(arms.graphdef, arms.params, arms.frozen, *dynamic, spec=static, mode=resolve(arms.mode))
    return DecodeOutput(*(None if x is None else to_host(x) for x in out))


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, placed as one global array on `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def params_on_mesh(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The model's parameters on `mesh`: as they are if already there, else per the partition rules."""
    devices = set(mesh.devices.flat)
    leaves = jax.tree.leaves(state)
    if all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in leaves):
        return state
    return jax.device_put(state, state_shardings(state, mesh))


# -- host-side batching --------------------------------------------------------------------------
def bucket_length(length: int, minimum: int = MIN_BUCKET) -> int:
    """The padded length for a batch whose longest sequence has `length` tokens: the next power of two."""
    return max(minimum, 1 << max(int(length) - 1, 0).bit_length())


def keep_last(seqs: RaggedTokens, max_length: int) -> RaggedTokens:
    """Cut sequences longer than `max_length` (> 0) to their last `max_length` tokens."""
    if max_length <= 0:
        return seqs
    cut = np.maximum(seqs.lengths - max_length, 0)
    return RaggedTokens(seqs.flat, seqs.starts + cut, seqs.lengths - cut)


def pad_tokens(seqs: RaggedTokens, length: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) int32 [n, length] with the padding (id 0) on `side` ('left' or 'right')."""
    ids = pad_and_stack([seqs[i] for i in range(len(seqs))], length, 0)
    cols = np.arange(length)[None, :]
    if side == "right":
        return ids, (cols < seqs.lengths[:, None]).astype(np.int32)
    shift = (length - seqs.lengths)[:, None]
    ids = np.take_along_axis(ids, (cols - shift) % length, axis=1)
    return ids, (cols >= shift).astype(np.int32)


def default_mesh() -> Mesh:
    """The 1x1x1 mesh on the default device: the single-device run takes the same code path."""
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def data_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def generate(
    model: CausalLM,
    prompt_ids: Sequence[Sequence[int]] | RaggedTokens,
    cfg: SamplingConfig,
    mesh: Mesh | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
    arms: ArmWeights | None = None,
) -> GenerationResult | list[GenerationResult]:
    """cfg.n responses to each prompt (token ids, no padding).

    `indices` are the prompts' global indices (default 0..N-1); they seed the random keys, so a
    prompt gets the same responses whichever call or batch it is in. Stop tokens are cfg.stop_ids
    plus the model config's EOS ids. With `arms` (models of `model`'s shape stacked on one axis),
    all arms sample in one program (bpo_jax.stacking) with the same keys, and the result is one
    GenerationResult per arm, each equal to what that arm would sample alone.
    """
    seqs = prompt_ids if isinstance(prompt_ids, RaggedTokens) else RaggedTokens.from_lists(prompt_ids)
    num = len(seqs)
    if num and seqs.lengths.min() == 0:
        raise ValueError(f"prompt {int(np.argmin(seqs.lengths))} has no tokens")
    seqs = keep_last(seqs, cfg.max_prompt_length)
    indices = np.arange(num) if indices is None else np.asarray(indices, np.int64)
    if indices.shape != (num,):
        raise ValueError(f"indices has shape {indices.shape}, expected ({num},)")
    mesh = mesh or default_mesh()
    n, m = cfg.n, cfg.max_new_tokens
    shards = data_shards(mesh)
    rows = -(-cfg.batch_size * n // shards) * shards
    spec = DecodeSpec(
        max_new_tokens=m,
        temperature=float(cfg.temperature),
        top_k=int(cfg.top_k),
        top_p=float(cfg.top_p),
        stop_ids=tuple(sorted(set(cfg.stop_ids) | set(model.config.eos_token_ids))),
        min_new_tokens=int(cfg.min_new_tokens),
        cache_sharding=batch_sharding(mesh, 4),
    )
    num_arms = 1 if arms is None else arms.num_arms
    tokens = np.zeros((num_arms, num, n, m), np.int32)
    lengths = np.zeros((num_arms, num, n), np.int64)
    finished = np.zeros((num_arms, num, n), bool)
    order = np.argsort(-seqs.lengths, kind="stable")  # longest first: similar lengths share a batch
    start_time, generated = time.perf_counter(), 0
    bar = tqdm(total=num, desc="sampling", unit="prompt", disable=not progress or jax.process_index() != 0)
    for start in range(0, num, cfg.batch_size):
        sel = order[start : start + cfg.batch_size]
        prompt_of_row = np.repeat(sel, n)
        ids, mask = pad_tokens(seqs.take(prompt_of_row), bucket_length(seqs.lengths[sel].max()), "left")
        filler = rows - len(prompt_of_row)
        out = decode_batch(
            model,
            np.pad(ids, ((0, filler), (0, 0))),
            np.pad(mask, ((0, filler), (0, 0))),
            np.pad(indices[prompt_of_row], (0, filler)),
            np.pad(np.tile(np.arange(n), len(sel)), (0, filler)),
            np.arange(rows) < len(prompt_of_row),
            cfg.seed,
            spec,
            mesh,
            arms,
        )
        if arms is None:
            out = DecodeOutput(*(None if x is None else x[None] for x in out))
        real = len(prompt_of_row)
        tokens[:, sel] = out.tokens[:, :real].reshape(num_arms, len(sel), n, m)
        lengths[:, sel] = out.lengths[:, :real].reshape(num_arms, len(sel), n)
        finished[:, sel] = out.finished[:, :real].reshape(num_arms, len(sel), n)
        generated += int(out.lengths[:, :real].sum())
        bar.update(len(sel))
        bar.set_postfix(tok_per_s=f"{generated / (time.perf_counter() - start_time):.1f}")
    bar.close()
    results = [
        GenerationResult([[tokens[a, i, j, : lengths[a, i, j]].tolist() for j in range(n)] for i in range(num)], finished[a], lengths[a])
        for a in range(num_arms)
    ]
    return results[0] if arms is None else results


# -- the pipeline stage --------------------------------------------------------------------------
def encode_records(records: Sequence[PromptRecord], tokenizer: Tokenizer) -> RaggedTokens:
    """Prompt records as sampling sees them: a string encoded with the special tokens, a
    conversation rendered with the chat template plus the generation prompt."""
    texts = [render_prompt(r.prompt, tokenizer, r.id) for r in records]
    return encode_prompts(texts, [isinstance(r.prompt, list) for r in records], tokenizer)


def stopping_at_eos(cfg: SamplingConfig, tokenizer: Tokenizer) -> SamplingConfig:
    """`cfg` that also stops at the tokenizer's EOS (it may differ from the model config's)."""
    return dataclasses.replace(cfg, stop_ids=cfg.stop_ids + (tokenizer.eos_id,))


def response_texts(result: GenerationResult, tokenizer: Tokenizer) -> list[list[str]]:
    """texts[i][j]: the j-th response to prompt i as text; the stop token ends a response and is
    not part of its text."""
    kept = [seq[:-1] if fin else seq for seqs, fins in zip(result.tokens, result.finished) for seq, fin in zip(seqs, fins)]
    flat = tokenizer.decode_batch(kept)
    n = result.finished.shape[1] if result.finished.ndim == 2 else 0
    return [flat[i * n : (i + 1) * n] for i in range(len(result.tokens))]


def sample_stage(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts_path: str | Path,
    out_path: str | Path,
    cfg: SamplingConfig,
    mesh: Mesh | None = None,
    *,
    chunk_size: int = 0,
    progress: bool = True,
) -> int:
    """Sample cfg.n responses per prompt of a prompts file into a responses JSONL, resumably.

    Prompts {id?, prompt}: a string is encoded with the tokenizer's special tokens, a conversation
    is rendered with the chat template plus the generation prompt. Output records
    {id, prompt, responses: [str], truncated: [bool]} are written chunk by chunk (`chunk_size`
    prompts, default 4 decode batches); a rerun skips prompts already written. Returns the number
    of prompts sampled by this call (this process's, multi-host: each process samples its share
    of the prompts on its own devices, bpo_jax.distributed).
    """
    prompts_path = Path(prompts_path)
    if jax.process_count() > 1:
        mesh = local_mesh(mesh or make_mesh())
        model = local_model(model, mesh)
    records: list[PromptRecord] = list(iter_records(prompts_path, "prompts"))
    check_unique_ids([r.id for r in records], str(prompts_path))
    cfg = stopping_at_eos(cfg, tokenizer)
    # Settings that shape the responses (the batch size does not: keys follow the prompt index).
    settings = {"stage": "sample", **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"}}
    out = ResumableJsonl(out_path, settings)
    done = out.done_ids()
    pending = [int(i) for i in share(len(records)) if records[i].id not in done]
    chunk_size = chunk_size or 4 * cfg.batch_size
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start : start + chunk_size]
        ids = encode_records([records[i] for i in chunk], tokenizer)
        empty = np.flatnonzero(ids.lengths == 0)
        if len(empty):
            rec = records[chunk[empty[0]]]
            raise DataError(f"{prompts_path} id={rec.id}", "prompt", "empty", "encodes to no tokens")
        result = generate(model, ids, cfg, mesh, indices=chunk, progress=progress)
        texts_out = response_texts(result, tokenizer)
        out.write_chunk(
            {
                "id": records[i].id,
                "prompt": records[i].prompt,
                "responses": texts_out[k],
                "truncated": (~result.finished[k]).tolist(),
            }
            for k, i in enumerate(chunk)
        )
    out.finalize([r.id for r in records])
    return len(pending)
