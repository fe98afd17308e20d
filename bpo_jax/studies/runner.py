"""Run a study: shared upstream work once, every arm's data, stacked training, paired evaluation.

    shared_dir/                one ordinary run: SFT, sampling at the largest n, scoring (default
                               study_dir/shared; studies with equal upstream settings may share one)
    shared_dir/scored_nN.jsonl every prompt's first N responses (nested samples)
    study_dir/breadth/KEY/     breadth compression (arms with bpo.breadth_enabled), on shared samples
    study_dir/data/KEY/        one ordinary run per distinct data recipe: pairs, bpo -> the arm's pairs
    study_dir/train/KEY/       one stacked program per group of arms (checkpoints, metrics.json)
    study_dir/runs/ARM~sSEED.json + .npz   each (arm, seed): its report and held-out rewards
    study_dir/results.jsonl, summary.json, report.md, *.png

Arms differ only in what the study file says: they share the SFT model, the sampled responses
(an arm at n < max takes each prompt's first n, which is what sampling n would have drawn: keys
follow the prompt and sample index), the number of optimizer steps and the batch size (an arm
with fewer pairs runs more epochs), and the held-out prompts and sampling keys at evaluation.
Arms with the same training recipe train as one program (bpo_jax.arms; vmap or a loop over
arms, bpo_jax.stacking) and are sampled together. Every file is written atomically and every finished (arm, seed) is kept: rerunning the
command after a kill redoes only what is missing or was made with other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bpo_jax.config import ConfigError, RunConfig, config_to_dict, load_config, resolve_seeds
from bpo_jax.io_utils import atomic_open, write_json, write_jsonl
from bpo_jax.provenance import environment, signature
from bpo_jax.studies.spec import Arm, Study, StudyError, load_study, run_stem

# What every arm must share (sample.n excepted: arms at smaller n take nested subsets).
SHARED_PREFIXES = ("seed", "model", "data", "sft", "sample", "reward", "eval")
# Training settings that may differ inside one stacked program (everything else must match).
PER_ARM_TRAIN_KEYS = ("train.seed",)


@dataclasses.dataclass
class ArmRun:
    """One (arm, seed) of the study."""

    arm: Arm
    seed: int
    config: RunConfig

    @property
    def id(self) -> str:
        return f"{self.arm.name}~s{self.seed}"

    @property
    def file_stem(self) -> str:
        return run_stem(self.arm.name, self.seed)


def log(message: str) -> None:
    print(message, flush=True)


def _flat(config: RunConfig) -> dict[str, Any]:
    from bpo_jax.provenance import flatten

    return flatten(config_to_dict(config))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def arm_runs(study: Study, num_devices: int | None = None) -> list[ArmRun]:
    """Every (arm, seed) as a validated run config; refuses arms that would not share upstream work."""
    runs = []
    for arm in study.arms:
        for seed in study.seeds:
            try:
                config = load_config(study.base, study.run_overrides(arm, seed), num_devices=num_devices)
            except ConfigError as e:
                raise StudyError(e.key, f"arm {arm.name!r}, seed {seed}: {e.problem}", str(study.path)) from None
            if config.train.max_steps <= 0:
                raise StudyError("train.max_steps", "must be > 0 in a study: every arm trains the same number of steps",
                                 str(study.path))
            if config.data.pairs or config.data.scored:
                raise StudyError("data.pairs" if config.data.pairs else "data.scored",
                                 "a study samples and scores its own responses; leave it unset", str(study.path))
            if not config.data.eval_prompts:
                raise StudyError("data.eval_prompts", "a study evaluates every arm on held-out prompts: set it", str(study.path))
            runs.append(ArmRun(arm, seed, config))
    reference = {k: v for k, v in _flat(runs[0].config).items() if k.startswith(SHARED_PREFIXES) and k != "sample.n"}
    for run in runs[1:]:
        flat = _flat(run.config)
        for key, value in reference.items():
            if flat.get(key) != value:
                raise StudyError(key, f"differs between arms ({runs[0].id}: {value!r}, {run.id}: {flat.get(key)!r}); "
                                      "arms must share SFT, sampling (except sample.n), reward and evaluation", str(study.path))
    return runs


# -- shared upstream ----------------------------------------------------------------------------------
def shared_config(study: Study, runs: Sequence[ArmRun]) -> RunConfig:
    """The run that does SFT, sampling (at the largest n, every prompt) and scoring for all arms."""
    n = max(r.config.sample.n for r in runs)
    items = list(study.overrides) + [f"run_dir={json.dumps(str(study.shared_dir))}", f"sample.n={n}",
                                     "bpo.breadth_enabled=false", "bpo.depth_allocator=off", "bpo.pairs_per_prompt=0"]
    return load_config(study.base, items)


def run_shared(config: RunConfig) -> None:
    from bpo_jax.pipeline import run_pipeline

    for stage in ("sft", "sample", "score"):
        run_pipeline(config, stage)


def nested_scored(shared_scored: Path, n: int, out: Path) -> Path:
    """Every prompt's first n responses (and their rewards and flags) of the shared scored file."""
    rows = []
    with open(shared_scored, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                group = json.loads(line)
                total = len(group["responses"])
                if total < n:
                    raise ValueError(f"{shared_scored}: prompt {group.get('id')} has {total} responses, fewer than n = {n}")
                rows.append({k: v[:n] if isinstance(v, list) and len(v) == total else v for k, v in group.items()})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not out.exists() or out.read_text(encoding="utf-8") != text:  # same bytes: downstream stays fresh
        with atomic_open(out) as f:
            f.write(text)
    return out


# -- each arm's data ------------------------------------------------------------------------------------
def starting_model(shared: RunConfig) -> list[str]:
    """Overrides that make a derived run start from the shared run's SFT model (none without SFT)."""
    from bpo_jax.pipeline import Run

    base_model = Run(shared).reference_dir
    if base_model is None:
        return []
    return [f"model.path={json.dumps(str(base_model))}", "model.init=null", "model.gguf=null"]


def data_config(study: Study, run: ArmRun, shared: RunConfig, scored: Path) -> RunConfig:
    """The ordinary run that turns this arm's scored groups into its training pairs (pairs, bpo)."""
    items = study.run_overrides(run.arm, run.seed) + starting_model(shared) + [
        f"data.scored={json.dumps(str(scored))}", "sft.enabled=false", "bpo.breadth_enabled=false"]
    key = _digest(signature("bpo", config_to_dict(load_config(study.base, items + ["run_dir=x"]))))
    return load_config(study.base, items + [f"run_dir={json.dumps(str(study.run_dir / 'data' / key))}"])


def breadth_scored(study: Study, run: ArmRun, shared: RunConfig, scored: Path) -> Path:
    """Breadth compression for an arm with bpo.breadth_enabled: the representative prompts are
    chosen as the pipeline chooses them (same embedder, model, seed), then their groups kept."""
    from bpo_jax.pipeline import Run, breadth_selection

    b = run.config.bpo
    seed = resolve_seeds(run.config).bpo.seed  # null inherits the run's seed
    base_model = Run(shared).reference_dir
    directory = study.run_dir / "breadth" / _digest({"prompts": str(shared.data.prompts), "num_prompts": b.num_prompts,
                                                     "embedder": b.embedder, "seed": seed, "model": str(base_model)})
    items = list(study.overrides) + starting_model(shared) + [
        f"run_dir={json.dumps(str(directory))}", "sft.enabled=false", f"bpo.num_prompts={b.num_prompts}",
        f"bpo.embedder={json.dumps(b.embedder)}", f"bpo.seed={seed}", "bpo.breadth_enabled=true"]
    breadth_run = Run(load_config(study.base, items))
    selected = breadth_selection(breadth_run, Path(shared.data.prompts))
    with open(selected, encoding="utf-8") as f:
        keep = {json.loads(line)["id"] for line in f if line.strip()}
    out = directory / f"{scored.stem}.jsonl"
    with open(scored, encoding="utf-8") as f, atomic_open(out) as g:
        for line in f:
            if line.strip() and json.loads(line)["id"] in keep:
                g.write(line)
    return out


def arm_data(study: Study, run: ArmRun, shared: RunConfig) -> tuple[RunConfig, dict]:
    """Build (or find) the arm's training pairs; returns the data run's config and a data report."""
    from bpo_jax.pipeline import Run, run_pipeline

    scored = nested_scored(Run(shared).scored, run.config.sample.n,
                           study.shared_dir / f"scored_n{run.config.sample.n}.jsonl")
    if run.config.bpo.breadth_enabled:
        scored = breadth_scored(study, run, shared, scored)
    config = data_config(study, run, shared, scored)
    for stage in ("pairs", "bpo"):
        run_pipeline(config, stage)
    data_run = Run(config)
    return config, data_report(data_run, scored)


def data_report(data_run, scored: Path) -> dict:
    """How many pairs and prompts the arm trains on, and why other prompts have none."""
    with open(scored, encoding="utf-8") as f:
        prompts_in = sum(1 for line in f if line.strip())
    with open(data_run.preference_data, encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    prompts = {p["meta"].get("prompt_id", p["id"]) for p in pairs}
    pairs_report = json.loads((data_run.pairs_dir / "pairs_report.json").read_text())
    bpo_path = data_run.root / "bpo" / "bpo_report.json"
    report = {"scored_prompts": prompts_in, "pairs": len(pairs), "prompts": len(prompts),
              "pairs_stage_skipped": pairs_report.get("skipped", {}), "train_pairs": str(data_run.preference_data)}
    if bpo_path.exists():
        bpo = json.loads(bpo_path.read_text())
        report["bpo"] = {k: bpo[k] for k in ("allocator", "budget", "prompts_short_of_k") if k in bpo}
    return report


# -- training and evaluation ------------------------------------------------------------------------
def group_key(config: RunConfig) -> str:
    """Arms whose keys agree here train as one stacked program (same graph, optimizer, steps)."""
    flat = _flat(config)
    return _digest({k: v for k, v in flat.items()
                    if k.startswith(("model", "lora", "train", "data.max_length", "data.max_prompt_length",
                                     "data.length_buckets")) and k not in PER_ARM_TRAIN_KEYS})


def eval_prompts(config: RunConfig, tokenizer) -> tuple[list, Any]:
    """The held-out prompts (the first eval.num_prompts) and their token ids, as sampling encodes them."""
    from bpo_jax.data.readers import iter_records
    from bpo_jax.sampling import encode_records

    records = list(iter_records(config.data.eval_prompts, "prompts"))[: config.eval.num_prompts or None]
    return records, encode_records(records, tokenizer)


def eval_sampling(run) -> Any:
    """The eval section's sampling settings, stopping where sample_stage would (bpo_jax.sampling)."""
    from bpo_jax.sampling import stopping_at_eos

    return stopping_at_eos(run.sampling_config(run.config.eval), run.tokenizer)


def score_results(run, records, results) -> list[np.ndarray]:
    """Reward [prompts, eval.n] of each GenerationResult."""
    from bpo_jax.sampling import response_texts

    out = []
    for result in results:
        texts = response_texts(result, run.tokenizer)
        prompts = [r.prompt for r in records for _ in texts[0]]
        flat = run.scorer(prompts, [t for row in texts for t in row])
        out.append(np.asarray(flat, np.float64).reshape(len(records), -1))
    return out


def reference_rewards(study: Study, shared: RunConfig) -> np.ndarray:
    """The starting policy's held-out rewards (what win rates compare against), computed once."""
    from bpo_jax.pipeline import Run, model_fingerprint
    from bpo_jax.sampling import generate

    run = Run(shared)
    key = _digest({"model": model_fingerprint(run),
                   "settings": {k: v for k, v in _flat(shared).items() if k.startswith("eval")},
                   "prompts": signature("eval", config_to_dict(shared))["inputs"]})
    path = study.run_dir / "reference_eval.npz"
    if path.exists():
        saved = np.load(path)
        if str(saved["key"]) == key:
            return saved["rewards"]
    log(f"[study] held-out samples of the reference policy ({run.reference_dir or 'base model'})")
    records, ids = eval_prompts(run.config, run.tokenizer)
    model = run.load_model(run.reference_dir)
    result = generate(model, ids, eval_sampling(run), run.mesh, indices=np.arange(len(records)))
    [rewards] = score_results(run, records, [result])
    with atomic_open(path, "wb") as f:
        np.savez(f, rewards=rewards, key=key)
    return rewards


def train_and_evaluate(study: Study, members: list[tuple[ArmRun, RunConfig, dict, str]], shared: RunConfig,
                       reference: np.ndarray) -> None:
    """Train a group of arms as one stacked program, sample and score them, save each (arm, seed)."""
    from flax import nnx

    from bpo_jax.arms import ArmsTrainer, fit_arms
    from bpo_jax.data.batching import PreferenceBatcher
    from bpo_jax.data.readers import read_records
    from bpo_jax.models.lora import add_lora
    from bpo_jax.pipeline import Run, with_reference_logps
    from bpo_jax.sampling import default_mesh, generate
    from bpo_jax.train import DPOTrainer, trainable_filter

    runs = [Run(dataclasses.replace(data_cfg, train=dataclasses.replace(data_cfg.train, seed=arm.config.train.seed)))
            for arm, data_cfg, _, _ in members]
    first = runs[0]
    t = first.config.train
    mesh = default_mesh()
    datasets, initial, seeds = [], [], []
    for run in runs:
        pairs, _ = read_records(run.preference_data, "pairs", run.config.data.skip_bad_rows)
        data = run.tokenize(pairs)
        model = run.load_model(run.reference_dir)
        if t.reference == "precomputed":
            data = with_reference_logps(run, data, model)
        add_lora(model, run.config.lora, seed=run.config.train.seed)
        datasets.append(data)
        initial.append(nnx.split(model, trainable_filter(model), ...)[1])
        seeds.append(run.config.train.seed)
    template = first.load_model(first.reference_dir)
    add_lora(template, first.config.lora, seed=seeds[0])
    trainer = DPOTrainer(template, t, mesh, total_steps=t.max_steps)
    arms = ArmsTrainer(trainer, initial, seeds, mode=study.arms_mode)
    batchers = [PreferenceBatcher(d, t.batch_size, seed=s, buckets=first.buckets()) for d, s in zip(datasets, seeds)]
    group_dir = study.run_dir / "train" / _digest(sorted(fp for *_, fp in members))
    log(f"[study] training {len(members)} arms together: {t.max_steps} steps of {t.batch_size} pairs")
    state, history = fit_arms(arms, batchers, run_dir=group_dir, num_steps=t.max_steps, checkpoint_every=t.checkpoint_every)
    eval_run = Run(shared)
    records, ids = eval_prompts(eval_run.config, eval_run.tokenizer)
    log(f"[study] held-out samples of {len(members)} arms: {len(records)} prompts x {eval_run.config.eval.n}")
    results = generate(template, ids, eval_sampling(eval_run), mesh, indices=np.arange(len(records)), arms=arms.weights(state))
    rewards = score_results(eval_run, records, results)
    for (arm_run, _, report, fp), arm_rewards, arm_history, data in zip(members, rewards, history, datasets):
        save_arm_result(study, arm_run, fp, report, arm_rewards, reference, arm_history, len(data), t)


def save_arm_result(study, arm_run: ArmRun, fp: str, report: dict, rewards: np.ndarray, reference: np.ndarray,
                    history: list[dict], num_pairs: int, t) -> None:
    wins = (rewards > reference) + 0.5 * (rewards == reference)
    row = {
        "arm": arm_run.arm.name, "settings": arm_run.arm.settings, "seed": arm_run.seed, "fingerprint": fp,
        "data": report, "tokenized_pairs": num_pairs, "steps": t.max_steps, "batch_size": t.batch_size,
        "epochs": round(t.max_steps * t.batch_size / num_pairs, 3),
        "mean_reward": float(rewards.mean()), "win_rate": float(wins.mean()),
        "reference_mean_reward": float(reference.mean()),
        "final_loss": history[-1]["loss"], "final_reward_accuracy": history[-1]["rewards/accuracies"],
    }
    stem = study.run_dir / "runs" / arm_run.file_stem
    with atomic_open(stem.with_suffix(".npz"), "wb") as f:
        np.savez(f, rewards=rewards, wins=wins)
    write_json(stem.with_suffix(".json"), row)  # last: marks this (arm, seed) done


def finished(study: Study, run: ArmRun, fp: str) -> dict | None:
    path = (study.run_dir / "runs" / run.file_stem).with_suffix(".json")
    if path.exists() and path.with_suffix(".npz").exists():
        row = json.loads(path.read_text())
        if row.get("fingerprint") == fp:
            return row
    return None


def run_fingerprint(run: ArmRun, data_cfg: RunConfig) -> str:
    """What an (arm, seed)'s result depends on: its settings and the bytes of its training pairs."""
    from bpo_jax.pipeline import Run
    from bpo_jax.provenance import fingerprint

    settings = {k: v for k, v in _flat(run.config).items() if k != "run_dir"}
    return _digest({"settings": settings, "pairs": fingerprint(str(Run(data_cfg).preference_data))})


def run_study(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Run (or resume) a study and write its results, summary, report and plots; returns the summary."""
    import jax

    from bpo_jax.studies.report import summarize, write_outputs

    started, cpu_started = time.time(), time.process_time()
    study = load_study(path, overrides)
    runs = arm_runs(study, num_devices=jax.device_count())
    study.run_dir.mkdir(parents=True, exist_ok=True)
    log(f"[study] {study.name}: {len(study.arms)} arms x {len(study.seeds)} seeds -> {study.run_dir}")
    shared = shared_config(study, runs)
    run_shared(shared)
    reference = reference_rewards(study, shared)
    groups: dict[str, list] = {}
    fingerprints = []
    for run in runs:
        data_cfg, report = arm_data(study, run, shared)
        fingerprints.append(run_fingerprint(run, data_cfg))
        if finished(study, run, fingerprints[-1]) is None:
            groups.setdefault(group_key(run.config), []).append((run, data_cfg, report, fingerprints[-1]))
    pending = sum(len(g) for g in groups.values())
    log(f"[study] {len(runs) - pending} of {len(runs)} (arm, seed) runs done already; {pending} to train")
    for members in groups.values():
        for start in range(0, len(members), study.max_arms_per_program):
            train_and_evaluate(study, members[start : start + study.max_arms_per_program], shared, reference)
    rows = [finished(study, run, fp) for run, fp in zip(runs, fingerprints)]
    write_jsonl(study.run_dir / "results.jsonl", rows)
    timing = _record_time(study, time.time() - started, time.process_time() - cpu_started)
    summary = summarize(study, rows, reference, timing)
    write_outputs(study, summary)
    return summary


def _record_time(study: Study, seconds: float, cpu_seconds: float) -> dict:
    """Wall and CPU time of every invocation (a resumed study sums them), machine and versions.
    CPU time (all threads) tells the cost when other work shared the machine and stretched the wall time."""
    path = study.run_dir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    timing["invocations"].append({"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                                  "load_average": list(os.getloadavg()),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    timing["wall_seconds"] = round(sum(i["seconds"] for i in timing["invocations"]), 1)
    timing["cpu_seconds"] = round(sum(i.get("cpu_seconds", 0.0) for i in timing["invocations"]), 1)
    timing["environment"] = environment()
    write_json(path, timing)
    return timing
