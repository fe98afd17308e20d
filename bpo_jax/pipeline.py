"""The stages of a run, wired together through files in the run directory.

    prompts ──(breadth compression)──▶ selected_prompts.jsonl ──sample──▶ responses.jsonl
      ──score──▶ scored.jsonl ──pairs──▶ pairs/pairs.jsonl ──bpo──▶ train_pairs.jsonl
      ──train──▶ train/ (checkpoints, metrics) + policy/ (HF layout) ──eval──▶ eval/eval.json

Every stage writes its final output atomically and last, so "output exists" means "stage done":
a rerun skips finished stages, and the interrupted one resumes (sample/score append finished
chunks; sft/train restore their orbax checkpoint). A user may enter at any arrow by setting
data.scored (skip sample/score) or data.pairs (skip everything before train).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from bpo_jax import distributed, evaluate
from bpo_jax.config import (
    ConfigError, EvalSection, OptimSection, RunConfig, SampleSection, TrainSection, config_to_dict, resolve_seeds,
    save_config,
)
from bpo_jax.data.batching import PreferenceBatcher
from bpo_jax.data.readers import read_demonstrations, read_records
from bpo_jax.data.schema import DataError, parse_record
from bpo_jax.data.stats import write_stats
from bpo_jax.data.tokenize import TokenizedPairs, tokenize_pairs
from bpo_jax.io_utils import atomic_open, write_json, write_jsonl
from bpo_jax.models.config import ModelConfig
from bpo_jax.models.gguf import gguf_tokenizer, load_gguf_model
from bpo_jax.models.hf import load_hf_model, save_hf_model
from bpo_jax.models.llama import CausalLM, init_model
from bpo_jax.models.lora import add_lora
from bpo_jax.packaged_assets import resolve_path
from bpo_jax.pairs import run_pairs_stage
from bpo_jax.provenance import STAGES, Ledger, StaleUpstream, archive_config, upstream
from bpo_jax.rewards import RewardConfig, RewardScorer, build_scorer, read_groups, score_stage
from bpo_jax.sampling import SamplingConfig, sample_stage
from bpo_jax.sharding import make_mesh, param_sharding, shard_model
from bpo_jax.stage_inputs import check_stage_inputs
from bpo_jax.tokenizer import Tokenizer
from bpo_jax.train import DPOTrainer, SFTTrainer, fit, precompute_reference_logps

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


class Run:
    """One run directory: its paths, and the tokenizer, mesh and models its stages share.

    `config` is kept with its stage seeds resolved (null -> the top-level seed): stages read ints.
    """

    def __init__(self, config: RunConfig):
        self.config = resolve_seeds(config)
        self.root = Path(config.run_dir)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- files ----------------------------------------------------------------------------------
    sft_model = property(lambda self: self.root / "sft_model")
    selected_prompts = property(lambda self: self.root / "selected_prompts.jsonl")
    responses = property(lambda self: self.root / "responses.jsonl")
    pairs_dir = property(lambda self: self.root / "pairs")
    train_pairs = property(lambda self: self.root / "train_pairs.jsonl")
    policy = property(lambda self: self.root / "policy")
    eval_dir = property(lambda self: self.root / "eval")

    def outputs(self, stage: str) -> list[Path]:
        """Everything `stage` writes in the run directory (never a user's input file)."""
        r = self.root
        return {
            "stats": [r / "stats"],
            "sft": [self.sft_model, r / "sft", r / "gguf_tokenizer"],  # (the tokenizer follows model.gguf)
            "sample": [self.selected_prompts, r / "bpo" / "breadth_report.json", self.responses,
                       r / f".{self.responses.name}.parts"],
            "score": [r / "scored.jsonl", r / ".scored.jsonl.parts"],
            "pairs": [self.pairs_dir],
            "bpo": [r / "bpo" / name for name in ("candidate_pairs.jsonl", "features", "warmup", "depth.png",
                                                  "scores.png", "bpo_report.json")] + [self.train_pairs],
            "train": [self.policy, r / "train"],
            "eval": [self.eval_dir],
        }[stage]

    @property
    def scored(self) -> Path:
        return Path(self.config.data.scored) if self.config.data.scored else self.root / "scored.jsonl"

    @property
    def pairs(self) -> Path:
        return self.pairs_dir / "pairs.jsonl"

    @property
    def preference_data(self) -> Path:
        """What train reads: user pairs, else BPO-allocated pairs, else sweet-spot pairs."""
        if self.config.data.pairs:
            return Path(self.config.data.pairs)
        return self.train_pairs if self.train_pairs.exists() else self.pairs

    # -- shared objects -------------------------------------------------------------------------
    @cached_property
    def tokenizer_dir(self) -> Path:
        m = self.config.model
        if m.tokenizer is None and m.gguf is not None:
            # A GGUF holds its tokenizer as metadata: written out once, it is an ordinary tokenizer directory.
            directory = self.root / "gguf_tokenizer"
            if not (directory / "tokenizer_config.json").exists() and jax.process_index() == 0:  # written last
                gguf_tokenizer(m.gguf).save_pretrained(directory)
            distributed.barrier("gguf tokenizer written")
            return directory
        return Path(m.tokenizer or m.path)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_pretrained(self.tokenizer_dir)

    @cached_property
    def mesh(self):
        m = self.config.mesh
        return make_mesh((m.data, m.fsdp, m.tensor))

    def load_model(self, directory: Path | None = None) -> CausalLM:
        """A model from an HF directory (default: the configured base: a GGUF file, or a random init)."""
        m = self.config.model
        if directory is None and m.gguf is not None:
            return load_gguf_model(
                m.gguf, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, shardings=param_sharding(self.mesh)
            )
        if directory is None and m.init is not None:
            config = ModelConfig.from_hf_dict(dict(m.init), source="model.init", dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
            return shard_model(init_model(config, seed=self.config.seed), self.mesh)
        directory = directory or Path(m.path)
        return load_hf_model(
            directory, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, shardings=param_sharding(self.mesh)
        )

    @property
    def reference_dir(self) -> Path | None:
        """The policy's starting point: the SFT model when there is one, else the base model."""
        if self.config.sft.enabled:
            return self.sft_model
        return Path(self.config.model.path) if self.config.model.path else None

    def save_model(self, model: CausalLM, directory: Path) -> None:
        extras = {name: self.tokenizer_dir / name for name in TOKENIZER_FILES if (self.tokenizer_dir / name).exists()}
        save_hf_model(model, directory, extra_files=extras)

    def tokenize(self, pairs: list) -> TokenizedPairs:
        d = self.config.data
        data, report = tokenize_pairs(pairs, self.tokenizer, d.max_length, d.max_prompt_length)
        if report.n_prompt_truncated or report.n_response_truncated or report.n_dropped_empty:
            log(f"  truncation: {report.to_dict()}")
        return data

    def buckets(self) -> tuple[int, ...] | None:
        return tuple(self.config.data.length_buckets) or None

    @cached_property
    def scorer(self) -> RewardScorer | None:
        """The configured reward (None: rewards come with the data)."""
        r = self.config.reward
        cfg = RewardConfig(kind=r.kind, model_path=r.model_path, rule=r.function, gym_task=r.gym_task,
                           gym_config=r.gym_config, batch_size=r.batch_size, label=r.label)
        return build_scorer(cfg, distributed.local_mesh(self.mesh))  # each process scores its share

    def sampling_config(self, section: SampleSection | EvalSection) -> SamplingConfig:
        return SamplingConfig(
            n=section.n,
            temperature=section.temperature,
            top_p=getattr(section, "top_p", 1.0),
            top_k=getattr(section, "top_k", 0),
            max_new_tokens=section.max_new_tokens,
            min_new_tokens=section.min_new_tokens,
            max_prompt_length=self.config.data.max_prompt_length,
            batch_size=section.batch_size,
            seed=section.seed,
        )


def _done(path: Path, stage: str) -> bool:
    if path.exists():
        log(f"[{stage}] done already: {path}")
        return True
    return False


# -- stages ---------------------------------------------------------------------------------------
def stage_stats(run: Run) -> None:
    d = run.config.data
    for name in ("prompts", "scored", "pairs"):
        path = getattr(d, name)
        out = run.root / "stats" / name
        if path and not _done(out / f"{Path(path).name.split('.')[0]}.stats.json", "stats"):
            write_stats(path, out)  # prints the table


def stage_sft(run: Run) -> None:
    cfg = run.config.sft
    if not cfg.enabled or _done(run.sft_model / "config.json", "sft"):
        return
    log(f"[sft] {cfg.steps} steps on {cfg.data}")
    data = run.tokenize(read_demonstrations(cfg.data))
    batches = PreferenceBatcher(data, cfg.batch_size, seed=run.config.seed, buckets=run.buckets(), **distributed.host_rows())
    train_cfg = TrainSection(
        batch_size=cfg.batch_size,
        optim=OptimSection(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, schedule="cosine"),
        seed=run.config.seed,
    )
    trainer = SFTTrainer(run.load_model(), train_cfg, run.mesh, total_steps=cfg.steps)
    state = fit(trainer, batches, run_dir=run.root / "sft", num_steps=cfg.steps, checkpoint_every=max(cfg.steps // 4, 1), name="sft")
    run.save_model(trainer.model_at(state), run.sft_model)


def stage_sample(run: Run) -> None:
    if run.config.data.scored or run.config.data.pairs or _done(run.responses, "sample"):
        return
    prompts = Path(run.config.data.prompts)
    if run.config.bpo.breadth_enabled:
        prompts = breadth_selection(run, prompts)
    log(f"[sample] {run.config.sample.n} responses per prompt of {prompts}")
    model = run.load_model(run.reference_dir)
    s = run.config.sample
    sample_stage(model, run.tokenizer, prompts, run.responses, run.sampling_config(s), run.mesh)


def breadth_selection(run: Run, prompts: Path) -> Path:
    """BPO breadth compression: bpo.num_prompts representative prompts into selected_prompts.jsonl.

    Returns the prompts file to sample from: `prompts` itself when breadth compression is off.
    The report (bpo/breadth_report.json) is written before the prompts file, which marks it done.
    """
    from bpo_jax import balance
    from bpo_jax.data.readers import write_records

    b = run.config.bpo
    if not b.breadth_enabled:
        return prompts
    if _done(run.selected_prompts, "sample"):
        return run.selected_prompts
    records, _ = read_records(prompts, "prompts", run.config.data.skip_bad_rows)

    def embed(texts: list) -> np.ndarray:
        log(f"[sample] breadth compression: embedding {len(texts)} unique prompts ({b.embedder})")
        model = run.load_model(run.reference_dir) if b.embedder == "policy" else None
        return balance.embed_prompts(
            texts, b.embedder, model=model, tokenizer=run.tokenizer if model is not None else None,
            batch_size=run.config.sample.batch_size, max_prompt_length=run.config.data.max_prompt_length,
            mesh=run.mesh, seed=b.seed,
        )

    kept, report = balance.breadth_compress(records, b.num_prompts, embed, seed=b.seed)
    write_json(run.root / "bpo" / "breadth_report.json", {"input": str(prompts), "embedder": b.embedder, **report})
    write_records(run.selected_prompts, kept)
    distributed.barrier("breadth selection written")
    log(f"[sample] breadth compression kept {report['breadth_after']} of {report['breadth_before']} unique prompts -> {run.selected_prompts}")
    return run.selected_prompts


def stage_score(run: Run) -> None:
    if run.config.data.scored or run.config.data.pairs or _done(run.scored, "score"):
        return
    log(f"[score] {run.config.reward.kind} rewards of {run.responses}")
    score_stage(run.responses, run.scored, run.scorer)


def stage_pairs(run: Run) -> None:
    if run.config.data.pairs or _done(run.pairs_dir / "pairs_report.json", "pairs"):
        return
    p = run.config.pairs
    report = run_pairs_stage(
        run.scored,
        run.pairs_dir,
        strategy=p.strategy,
        seed=p.seed,
        min_margin=p.min_margin,
        length_penalty=p.length_penalty,
        k_rej=p.k_rej,
        exclude_truncated=p.exclude_truncated,
        skip_bad_rows=run.config.data.skip_bad_rows,
    )
    log(f"[pairs] {p.strategy}: {json.dumps({k: v for k, v in report.items() if k not in ('outputs', 'input')})}")


def stage_bpo(run: Run) -> None:
    """BPO depth: scored groups -> candidate pairs -> (DPO warm-up) -> gradient features -> allocation.

    Writes bpo/candidate_pairs.jsonl, bpo/features/ (resumable shards), bpo/warmup/ (checkpoints),
    bpo/depth.png (+ bpo/scores.png), then train_pairs.jsonl (what train reads instead of
    pairs/pairs.jsonl) and last bpo/bpo_report.json, the stage's done marker. depth_allocator 'off'
    skips the stage (unless bpo.pairs_per_prompt asks for uniform balancing, see `uniform_depth`).
    pairs.strategy comes first among the candidate strategies, so with base_pair 'primary' every
    prompt's guaranteed pair is the pairs.strategy pick. Features differentiate the parameters
    training trains: the LoRA adapters, or every parameter without LoRA (bpo.trainable 'lora'),
    or those matching bpo.trainable.
    """
    from bpo_jax import depth, gradients
    from bpo_jax.models.lora import has_lora

    b, t, p = run.config.bpo, run.config.train, run.config.pairs
    out = run.root / "bpo"
    if run.config.data.pairs or (b.depth_allocator == "off" and not b.pairs_per_prompt) or _done(out / "bpo_report.json", "bpo"):
        return
    groups = [g.to_dict() for g in read_records(run.scored, "scored", run.config.data.skip_bad_rows)[0]]
    pair_options = dict(seed=p.seed, min_margin=p.min_margin, length_penalty=p.length_penalty, k_rej=p.k_rej,
                        exclude_truncated=p.exclude_truncated, skip_bad_rows=run.config.data.skip_bad_rows)
    if b.pairs_per_prompt:
        uniform_depth(run, groups, pair_options)
        return
    strategies = (p.strategy,) + tuple(s for s in b.candidate_strategies if s != p.strategy)
    candidates, candidate_report = depth.candidate_pairs(groups, strategies, **pair_options)
    if not candidates:
        raise ValueError(f"{run.scored}: no prompt yields a candidate pair with strategies {list(strategies)}")
    candidates_path = out / "candidate_pairs.jsonl"
    write_jsonl(candidates_path, candidates)
    data = run.tokenize([parse_record(c, "pairs", i, f"{candidates_path}:{i + 1}") for i, c in enumerate(candidates)])
    kept = [candidates[i] for i in data.source_index]  # tokenization drops pairs left empty by truncation
    prompt_of = {g["id"]: i for i, g in enumerate(groups)}
    group = np.array([prompt_of[c["meta"]["prompt_id"]] for c in kept])
    margins = np.array([c["meta"]["margin"] for c in kept])
    lengths = data.chosen.lengths + data.rejected.lengths
    log(f"[bpo] {len(kept)} candidate pairs for {len(set(group.tolist()))} prompts; allocator {b.depth_allocator}")

    scores, feature_report = None, None
    if b.depth_allocator == "gradient":
        model = run.load_model(run.reference_dir)
        if t.loss_type != "simpo":  # the reference is the starting model in every reference mode
            data = with_reference_logps(run, data, model)
        add_lora(model, run.config.lora, seed=t.seed)
        trainable = b.trainable if b.trainable != "lora" or has_lora(model) else ".*"
        adam = None
        if b.warmup_steps:
            log(f"[bpo] DPO warm-up: {b.warmup_steps} steps before gradient features")
            warm_cfg = dataclasses.replace(
                t, reference="none" if t.loss_type == "simpo" else "precomputed",
                optim=dataclasses.replace(t.optim, schedule="constant", warmup_steps=0),
            )
            trainer = DPOTrainer(model, warm_cfg, run.mesh, total_steps=b.warmup_steps)
            batches = PreferenceBatcher(data, t.batch_size, seed=t.seed, buckets=run.buckets(), **distributed.host_rows())
            state = fit(trainer, batches, run_dir=out / "warmup", num_steps=b.warmup_steps, name="bpo-warmup")
            model = trainer.model_at(state)
            adam = gradients.adam_moments(state.opt_state, b1=t.optim.b1, b2=t.optim.b2, eps=t.optim.eps)
        settings = gradients.FeatureSettings(
            proj_dim=b.proj_dim, seed=b.seed, trainable=trainable, loss_type=t.loss_type, beta=t.beta,
            label_smoothing=t.label_smoothing, gamma=t.gamma, projection=b.projection, vocab_chunk=t.vocab_chunk,
        )
        # Multi-host: each process featurizes the pairs of its share of the prompts on its own devices.
        mesh = distributed.local_mesh(run.mesh)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        featurizer = gradients.GradientFeaturizer(
            distributed.local_model(model, mesh), settings, micro_batch=b.feature_batch_size,
            adam_state=adam and adam._replace(**distributed.gather({"mu": adam.mu, "nu": adam.nu, "count": adam.count})),
            mesh=mesh if b.feature_batch_size % shards == 0 else None,
        )
        rows = featurizer.rows_per_call(len(data))
        mine = np.flatnonzero(np.isin(group, distributed.share(len(groups))))
        meta = {**dataclasses.asdict(settings), "warmup_steps": b.warmup_steps, "lora": dataclasses.asdict(run.config.lora),
                "model": model_fingerprint(run), "data": data_fingerprint(data)}
        log(f"[bpo] gradient features of {featurizer.num_params} parameters -> {b.proj_dim} dims")
        gradients.extract_features(
            distributed.share_batches(data, mine, rows, run.buckets()), featurizer, out_dir=out / "features",
            meta=meta, total=-(-len(mine) // rows), progress=jax.process_index() == 0,
        )
        features, index = gradients.read_feature_shards(out / "features")
        if not np.array_equal(index, np.arange(len(kept))):
            raise ValueError(f"{out / 'features'}: shards hold examples {index[:5].tolist()}..., not 0..{len(kept) - 1}")
        clustering = depth.spherical_kmeans(features, b.num_clusters, seed=b.seed)
        scores = depth.bpo_scores(features, clustering)
        feature_report = {
            "trainable": trainable, "num_params": featurizer.num_params, "proj_dim": b.proj_dim,
            "warmup_steps": b.warmup_steps, "clusters": np.bincount(clustering.labels).tolist(),
            "usefulness": scores.usefulness.tolist(),
            "score": {"min": float(scores.scores.min()), "mean": float(scores.scores.mean()), "max": float(scores.scores.max())},
        }

    budget = b.budget or depth.default_budget(len(set(group.tolist())), len(kept))
    allocation_input = depth.Candidates(group, margins, lengths, None if scores is None else scores.scores)
    selected = depth.allocate(allocation_input, b.depth_allocator, budget, seed=b.seed, base_pair=b.base_pair)
    depth.plot_depth(group, selected, out / "depth.png", title=f"BPO depth allocation ({b.depth_allocator}, M = {budget})")
    if scores is not None:
        depth.plot_scores(scores, selected, out / "scores.png")
        for i in selected:
            kept[i]["meta"].update(bpo_score=float(scores.scores[i]), bpo_cluster=int(clustering.labels[i]))
    write_jsonl(run.train_pairs, (kept[i] for i in selected))
    report = {"allocator": b.depth_allocator, "budget": budget, "candidates": candidate_report,
              **depth.depth_report(group, selected), "features": feature_report,
              "outputs": {"train_pairs": str(run.train_pairs), "candidates": str(candidates_path)}}
    write_json(out / "bpo_report.json", report)
    log(f"[bpo] {len(selected)} pairs -> {run.train_pairs} (depth {report['depth_candidates']['mean']:.2f} -> "
        f"{report['depth_allocated']['mean']:.2f} pairs per prompt)")


def uniform_depth(run: Run, groups: list[dict], pair_options: dict) -> None:
    """BPO's uniform breadth/depth balancing (bpo.pairs_per_prompt = k > 0): every prompt gets k
    pairs, its pairs.strategy pair first, then the rest by reward margin (balance.uniform_balance);
    with breadth compression to a fraction r of the prompts and k = 1/r, the total pair count stays
    that of one pair per prompt. Writes train_pairs.jsonl, then bpo/bpo_report.json (done marker)."""
    from bpo_jax import balance
    from bpo_jax.pairs import build_pairs

    b, p = run.config.bpo, run.config.pairs
    base, base_report = build_pairs(groups, p.strategy, **pair_options)
    first = {pair["id"]: (pair["meta"]["chosen_index"], pair["meta"]["rejected_index"]) for pair in base}
    pairs, report = balance.uniform_balance(groups, b.pairs_per_prompt, first_pairs=[first.get(g["id"]) for g in groups])
    write_jsonl(run.train_pairs, pairs)
    write_json(run.root / "bpo" / "bpo_report.json", {
        "allocator": "uniform_balance", "first_pair_strategy": p.strategy, "first_pairs": base_report["pairs_out"],
        **report, "outputs": {"train_pairs": str(run.train_pairs)},
    })
    log(f"[bpo] uniform balancing: {report['pairs_out']} pairs, {b.pairs_per_prompt} per prompt "
        f"({report['prompts_short_of_k']} of {report['prompts_in']} prompts had fewer) -> {run.train_pairs}")


def model_fingerprint(run: Run) -> str:
    """Identifies the reference model's weights: the bytes of its files, or the random-init recipe."""
    h = hashlib.sha256()
    directory = run.reference_dir
    if directory is not None:
        files = sorted(directory.glob("*.safetensors")) + [directory / "config.json"]
    elif run.config.model.gguf is not None:
        files = [resolve_path(run.config.model.gguf)]
    else:
        files = []
        h.update(json.dumps([run.config.model.init, run.config.seed], sort_keys=True).encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    h.update(f"{run.config.model.dtype}/{run.config.train.vocab_chunk}".encode())
    return h.hexdigest()


def data_fingerprint(data: TokenizedPairs) -> str:
    h = hashlib.sha256()
    for seqs in (data.prompt, data.chosen, data.rejected):
        for part in (seqs.flat, seqs.starts, seqs.lengths):
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def with_reference_logps(run: Run, data: TokenizedPairs, model: CausalLM) -> TokenizedPairs:
    """Attach reference log-probs, computed once and cached on disk keyed by data + model."""
    key = hashlib.sha256((data_fingerprint(data) + model_fingerprint(run)).encode()).hexdigest()[:16]
    cache = run.root / "train" / f"ref_logps_{key}.npz"
    if cache.exists():
        saved = np.load(cache)
        return data.with_ref_logps(saved["chosen"], saved["rejected"])
    log(f"[train] precomputing reference log-probs of {len(data)} pairs")
    batcher = PreferenceBatcher(data, run.config.train.batch_size, shuffle=False, buckets=run.buckets())
    batches = tqdm(batcher.epoch_batches(), total=batcher.batches_per_epoch, desc="reference log-probs", unit="batch",
                   disable=jax.process_index() != 0)
    index, chosen, rejected = precompute_reference_logps(model, batches, run.mesh, run.config.train.vocab_chunk)
    order = np.argsort(index)
    chosen, rejected = chosen[order], rejected[order]
    if jax.process_index() == 0:
        with atomic_open(cache, "wb") as f:
            np.savez(f, chosen=chosen, rejected=rejected)
    return data.with_ref_logps(chosen, rejected)


def stage_train(run: Run) -> None:
    if _done(run.policy / "config.json", "train"):
        return
    t = run.config.train
    pairs, _ = read_records(run.preference_data, "pairs", run.config.data.skip_bad_rows)
    data = run.tokenize(pairs)
    model = run.load_model(run.reference_dir)
    if t.reference == "precomputed":
        data = with_reference_logps(run, data, model)
    add_lora(model, run.config.lora, seed=t.seed)
    batches = PreferenceBatcher(data, t.batch_size, seed=t.seed, buckets=run.buckets(), **distributed.host_rows())
    steps = t.max_steps or t.num_epochs * batches.batches_per_epoch
    log(f"[train] {len(data)} pairs from {run.preference_data}, {steps} steps of {t.batch_size}")
    trainer = DPOTrainer(model, t, run.mesh, total_steps=steps)
    state = fit(
        trainer, batches, run_dir=run.root / "train", num_steps=steps,
        checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
    )
    run.save_model(trainer.model_at(state), run.policy)


def eval_responses(run: Run, model: CausalLM, prompts: Path, who: str) -> Path:
    """Sample `model`'s responses to the eval prompts and score them: eval/{who}_scored.jsonl."""
    e = run.config.eval
    responses, scored = run.eval_dir / f"{who}_responses.jsonl", run.eval_dir / f"{who}_scored.jsonl"
    if not responses.exists():
        sample_stage(model, run.tokenizer, prompts, responses, run.sampling_config(e), run.mesh)
    if not scored.exists():
        score_stage(responses, scored, run.scorer)
    return scored


def scored_rewards(path: Path) -> dict[str, list[float]]:
    return {g.id: g.rewards for g in read_groups(path, with_rewards=True)}


def stage_eval(run: Run) -> None:
    out = run.eval_dir / "eval.json"
    if out.exists():
        log(evaluate.format_table(json.loads(out.read_text())))
        return
    d, e = run.config.data, run.config.eval
    policy, reference = run.load_model(run.policy), run.load_model(run.reference_dir)
    results: dict = {"policy": str(run.policy), "reference": str(run.reference_dir or run.config.model.gguf or "random init")}
    if d.eval_prompts and run.scorer is not None:
        prompts = run.eval_dir / "prompts.jsonl"
        if not prompts.exists():
            rows = list(read_records(d.eval_prompts, "prompts", d.skip_bad_rows)[0])
            write_jsonl(prompts, ({"id": r.id, "prompt": r.prompt} for r in rows[: e.num_prompts or None]))
        distributed.barrier("eval prompts written")
        log(f"[eval] {e.n} responses per held-out prompt of {d.eval_prompts}, policy and reference")
        policy_rewards = scored_rewards(eval_responses(run, policy, prompts, "policy"))
        reference_rewards = scored_rewards(eval_responses(run, reference, prompts, "reference"))
        ids = sorted(policy_rewards)
        p = np.concatenate([policy_rewards[i] for i in ids])
        r = np.concatenate([reference_rewards[i] for i in ids])
        results.update(evaluate.compare_rewards(p, r), n_prompts=len(ids))
        evaluate.plot_reward_comparison(p, r, run.eval_dir / "rewards.png")
    if d.eval_pairs:
        pairs, _ = read_records(d.eval_pairs, "pairs", d.skip_bad_rows)
        log(f"[eval] preference accuracy on {len(pairs)} held-out pairs of {d.eval_pairs}")
        results.update(evaluate.preference_accuracy(policy, reference, run.tokenize(pairs), run.mesh, batch_size=e.batch_size))
    if jax.process_index() == 0:
        write_json(out, results)
    log(evaluate.format_table(results))


STAGE_FUNCTIONS: dict[str, Callable[[Run], None]] = {
    "stats": stage_stats,
    "sft": stage_sft,
    "sample": stage_sample,
    "score": stage_score,
    "pairs": stage_pairs,
    "bpo": stage_bpo,
    "train": stage_train,
    "eval": stage_eval,
}


def check_inputs(config: RunConfig) -> None:
    """Everything that can fail cheaply, tried before any heavy work: every input file read once (none
    may be empty), the rule reward function imported and its signature checked, the run directory
    writable."""
    d = config.data
    for kind, path in (("prompts", d.prompts), ("prompts", d.eval_prompts), ("pairs", d.eval_pairs),
                       ("scored", d.scored), ("pairs", d.pairs)):
        if not path:
            continue
        records, report = read_records(path, kind, d.skip_bad_rows)
        if report.n_skipped:  # data.skip_bad_rows: say what was left out, and where
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items()))
            log(f"warning: {path}: skipping {report.n_skipped} of {report.n_rows} rows ({reasons}); "
                f"first: {'; '.join(report.examples[:3])}")
        if not records:
            raise DataError(str(path), None, "empty", f"no {kind} records in the file")
    if config.sft.enabled and not read_demonstrations(config.sft.data):
        raise DataError(str(config.sft.data), None, "empty", "no demonstrations in the file")
    r = config.reward
    if r.kind == "rule" and d.prompts and not (d.scored or d.pairs):
        check_rule_signature(r.function)
    root = Path(config.run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise OSError(e.errno, f"run_dir is not writable ({e.strerror})", str(root)) from None


def check_vocabulary(run: Run) -> None:
    """Token ids past the model's embedding table would be silently clamped on device: refuse up front."""
    m = run.config.model
    if m.gguf is not None or (m.tokenizer is None and m.path is None):  # a GGUF file holds both: they match
        return
    model = ModelConfig.from_hf_dict(dict(m.init), source="model.init") if m.init else ModelConfig.from_file(m.path)
    if run.tokenizer.vocab_size > model.vocab_size:
        raise ConfigError("model.tokenizer" if m.tokenizer else "model.path",
                          f"the tokenizer has {run.tokenizer.vocab_size} tokens but the model's vocabulary only "
                          f"{model.vocab_size} (vocab_size of {'model.init' if m.init else m.path})",
                          str(run.tokenizer_dir / "tokenizer.json"))


def check_rule_signature(spec: str) -> None:
    """reward.function is called as f(prompts, responses) on lists; say so now rather than after sampling."""
    from bpo_jax.rewards import RewardError, load_rule

    rule = load_rule(spec)
    try:
        signature = inspect.signature(rule)
    except (TypeError, ValueError):  # some builtins have no signature to check
        return
    try:
        signature.bind(["prompt"], ["response"])
    except TypeError as e:
        raise RewardError(f"reward.function {spec}: cannot be called as f(prompts, responses) with two lists ({e})") from None


def run_pipeline(config: RunConfig, stage: str = "all") -> Run:
    """Run one stage, or every stage in order ('all'); finished stages are skipped."""
    if stage != "all" and stage not in STAGE_FUNCTIONS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)} or 'all'")
    check_inputs(config)
    run = Run(config)
    check_vocabulary(run)
    if stage != "all":
        check_stage_inputs(run, stage)  # names the stage that writes a missing input
    stages = STAGES if stage == "all" else (stage,)
    ledger = supersede_stale(run, stages)
    writer = jax.process_index() == 0
    if writer:
        kept = archive_config(run.root, config_to_dict(run.config))
        if kept:
            log(f"earlier config.yaml kept as {kept}")
        save_config(run.config, run.root / "config.yaml")
    for name in stages:
        if writer:
            ledger.start(name, config_to_dict(run.config))
        STAGE_FUNCTIONS[name](run)
        distributed.barrier(f"stage {name} done")  # its outputs are whole before any process reads them
        if writer:
            ledger.finish(name)
    return run


def supersede_stale(run: Run, stages: tuple[str, ...]) -> Ledger:
    """Provenance: move aside the outputs of every stage made with other settings or inputs, so they
    are redone; refuse to run a single stage on top of a stale upstream stage."""
    ledger = Ledger(run.root)
    settings = config_to_dict(run.config)
    stale = {name: changes for name in STAGES if (changes := ledger.changes(name, settings))}
    for name in stages:
        for up in upstream(name):
            if up in stale and up not in stages and any(p.exists() for p in run.outputs(up)):
                raise StaleUpstream(
                    f"{run.root}: stage {name!r} reads the outputs of stage {up!r}, made with other settings "
                    f"({'; '.join(stale[up])}); run all stages (or {up!r} first)"
                )
    if jax.process_index() == 0:
        for name, changes in stale.items():
            moved = ledger.supersede(name, run.outputs(name))
            if moved:
                log(f"[{name}] stale, settings changed since it ran ({'; '.join(changes)}): redoing it; "
                    f"its earlier outputs are in {moved}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("bpo_jax provenance")
    return ledger
