"""Command line: `python -m bpo_jax.main --config configs/demo.yaml [--set a.b=v ...] [stage]`.

Stages: stats, sft, sample, score, pairs, bpo, train, eval, or all (the default). The config is
validated in full (keys, types, files, mesh vs. devices) before any heavy work starts.
`python -m bpo_jax.main stats --data FILE` prints breadth/depth statistics of any data file.
`python -m bpo_jax.main study --config configs/studies/X.yaml` runs a study (bpo_jax.studies).
`python -m bpo_jax.main tfds --data [SPLIT=]FILE ... --out DATA_DIR [--name NAME] [--kind KIND]` prepares
JSONL/Parquet files as a TFDS dataset (array_record, no TensorFlow) that any data key can then name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bpo_jax.provenance import STAGES  # light: `--help` must not wait for JAX

RESUME_HINT = ("interrupted: run the same command again to resume (finished stages are skipped; sampling and "
               "scoring continue from their last chunk, training from its last checkpoint)")
STAGE_HELP = {
    "stats": "breadth/depth statistics of the configured data files",
    "sft": "supervised warm-up on demonstrations (sft.enabled)",
    "sample": "breadth compression (bpo.breadth_enabled), then sample.n on-policy responses per prompt",
    "score": "reward every response",
    "pairs": "reward-distribution (sweet-spot) pairs",
    "bpo": "BPO depth allocation from gradient clusters",
    "train": "DPO training -> policy/",
    "eval": "held-out rewards, win rate and preference accuracy, policy vs reference",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    epilog = "stages, in order (default: all; finished ones are skipped, stale ones redone):\n" + "\n".join(
        f"  {name:<7} {STAGE_HELP[name]}" for name in STAGES) + (
        "\n\nstudy --config STUDY.yaml   arms over config keys x seeds, trained together, with 95% CIs "
        "(configs/studies/)")
    parser = argparse.ArgumentParser(prog="python -m bpo_jax.main", description=__doc__.splitlines()[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", nargs="?", default="all", choices=("all",) + STAGES + ("tfds", "study"))
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.optim.learning_rate=1e-6 (repeatable)")
    parser.add_argument("--data", action="append", default=[], metavar="[SPLIT=]FILE",
                        help="with `stats` and no --config: the data file to describe; with `tfds`: a file "
                             "to prepare as split SPLIT (default train; repeatable)")
    parser.add_argument("--out", default=None,
                        help="with `stats --data FILE`: the directory for FILE's .stats.json and .depth.png (default: "
                             "FILE_stats/ beside it); with `tfds`: the TFDS data_dir")
    parser.add_argument("--name", help="with `tfds`: the dataset's config name (default: the first file's name)")
    parser.add_argument("--kind", default="auto",
                        help="with `tfds`: pairs, prompts, scored or demonstrations (default: from the first row)")
    args = parser.parse_args(argv)
    if args.stage == "tfds":
        if not args.data or not args.out:
            parser.error("tfds needs --data FILE (repeatable, [SPLIT=]FILE) and --out DATA_DIR")
        splits = [item.split("=", 1) if "=" in item else ["train", item] for item in args.data]
        args.splits = dict(splits)
        if len(args.splits) != len(splits):
            parser.error("tfds: each split may be given once")
    elif args.config is None and not (args.stage == "stats" and len(args.data) == 1):
        parser.error("--config is required (or use `stats --data FILE`, or `tfds --data FILE --out DIR`)")
    return args


def build_tfds(args: argparse.Namespace) -> int:
    """The `tfds` command: prepare the files, then print the reference a config's data key takes."""
    from bpo_jax.data.tfds_builder import build_tfds_dataset

    try:
        builder = build_tfds_dataset(args.splits, args.out, name=args.name, kind=args.kind)
    except (FileNotFoundError, ValueError) as e:  # ValueError: a bad row (DataError) or --kind
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = {name: split.num_examples for name, split in builder.info.splits.items()}
    print(f"{builder.builder_config.kind} dataset {builder.name}/{builder.builder_config.name}:{builder.version} "
          f"in {builder.data_dir} ({', '.join(f'{k}: {v} rows' for k, v in splits.items())})")
    key = {"demonstrations": "sft.data"}.get(builder.builder_config.kind, f"data.{builder.builder_config.kind}")
    print(f"use it in a config:  --set {key}={builder.data_dir}[{next(iter(splits))}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user error ends in one line on stderr and exit status 2, Ctrl-C in a resume hint."""
    try:
        return run_command(argv)
    except KeyboardInterrupt:
        print(f"\n{RESUME_HINT}", file=sys.stderr)
        return 130
    except Exception as e:  # (`--help` exits through SystemExit, never importing the error classes)
        if not isinstance(e, user_errors()):
            raise
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2


# (module, class) of the exceptions that describe a problem with the user's config, data, files or disk.
USER_ERRORS = (
    ("bpo_jax.checkpointing", "CheckpointDamaged"), ("bpo_jax.config", "ConfigError"),
    ("bpo_jax.data.schema", "DataError"), ("bpo_jax.models.config", "ModelConfigError"),
    ("bpo_jax.models.gguf", "GGUFError"), ("bpo_jax.models.hf", "CheckpointError"),
    ("bpo_jax.provenance", "StaleUpstream"), ("bpo_jax.resumable", "ResumeError"), ("bpo_jax.rewards", "RewardError"),
    ("bpo_jax.sampling", "SamplingConfigError"), ("bpo_jax.mesh_shape", "MeshError"),
    ("bpo_jax.tokenizer", "TokenizerError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a problem with the user's config, data, files or disk (not a bug).

    Only from modules already imported: an exception cannot come from a module that was never
    loaded, and importing them all here would load JAX just to report a config error.
    """
    loaded = [getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS]
    return (*(cls for cls in loaded if cls is not None), OSError)


def describe_error(e: BaseException) -> str:
    """One line: OS errors name their file; mesh errors say how to emulate devices on a CPU."""
    if isinstance(e, OSError) and e.strerror:
        names = [str(n) for n in (e.filename, e.filename2) if n]
        return f"{' -> '.join(names) or 'writing output'}: {e.strerror}"
    text = str(e)
    if getattr(e, "key", None) == "mesh" or type(e).__name__ == "MeshError":
        text += " (on a CPU, emulate N devices with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
    return text


def run_command(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "tfds":
        return build_tfds(args)
    if args.stage == "study":
        from bpo_jax.studies.spec import load_study

        load_study(args.config, args.overrides)  # the study file's own errors, before JAX is loaded
        from bpo_jax.compile_cache import enable_compile_cache
        from bpo_jax.studies.runner import run_study

        enable_compile_cache()
        run_study(args.config, args.overrides)
        return 0
    if args.config is None:
        from bpo_jax.data.stats import write_stats

        [data] = args.data
        out = Path(args.out) if args.out else Path(data).with_suffix("").with_name(Path(data).stem + "_stats")
        write_stats(data, out)  # prints the table
        return 0

    from bpo_jax.config import ConfigError, load_config, validate_devices

    try:
        config = load_config(args.config, args.overrides)
        if config.distributed.enabled:
            import jax

            d = config.distributed
            jax.distributed.initialize(
                coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id
            )
        import jax  # only now: load_config reports every error but the model config's without it

        validate_devices(config, num_devices=jax.device_count())
    except ConfigError as e:
        raise (e if e.where else e.located(args.config)) from None

    from bpo_jax.compile_cache import enable_compile_cache
    from bpo_jax.pipeline import run_pipeline

    enable_compile_cache()  # here, not at import: `import bpo_jax` leaves JAX's settings alone
    run_pipeline(config, args.stage)
    return 0


if __name__ == "__main__":
    from bpo_jax.host_memory import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()  # CPU hosts: restart once with malloc settings that keep step memory
    sys.exit(main())
