"""Command line: `python -m bpo_jax.main --config configs/demo.yaml [--set a.b=v ...] [stage]`.

Stages: stats, sft, sample, score, pairs, bpo, train, eval, or all (the default). The config is
validated in full (keys, types, files, mesh vs. devices) before any heavy work starts.
`python -m bpo_jax.main stats --data FILE` prints breadth/depth statistics of any data file.
`python -m bpo_jax.main tfds --data [SPLIT=]FILE ... --out DATA_DIR [--name NAME] [--kind KIND]` prepares
JSONL/Parquet files as a TFDS dataset (array_record, no TensorFlow) that any data key can then name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bpo_jax.pipeline import STAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bpo_jax.main", description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=("all",) + STAGES + ("tfds",))
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.optim.learning_rate=1e-6 (repeatable)")
    parser.add_argument("--data", action="append", default=[], metavar="[SPLIT=]FILE",
                        help="with `stats` and no --config: the data file to describe; with `tfds`: a file "
                             "to prepare as split SPLIT (default train; repeatable)")
    parser.add_argument("--out", default=None,
                        help="with `stats --data`: where to write the histogram PNG; with `tfds`: the TFDS data_dir")
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
    args = parse_args(argv)
    if args.stage == "tfds":
        return build_tfds(args)
    if args.config is None:
        from bpo_jax.data.stats import write_stats

        [data] = args.data
        out = Path(args.out) if args.out else Path(data).with_suffix("").with_name(Path(data).stem + "_stats")
        write_stats(data, out)  # prints the table
        return 0

    from bpo_jax.config import ConfigError, load_config, validate

    try:
        config = load_config(args.config, args.overrides)
        if config.distributed.enabled:
            import jax

            d = config.distributed
            jax.distributed.initialize(
                coordinator_address=d.coordinator_address, num_processes=d.num_processes, process_id=d.process_id
            )
        import jax

        validate(config, num_devices=jax.device_count())
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from bpo_jax.data.schema import DataError
    from bpo_jax.pipeline import run_pipeline

    try:
        run_pipeline(config, args.stage)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
