"""Command line: `python -m bpo_jax.main --config configs/demo.yaml [--set a.b=v ...] [stage]`.

Stages: stats, sft, sample, score, pairs, bpo, train, eval, or all (the default). The config is
validated in full (keys, types, files, mesh vs. devices) before any heavy work starts.
`python -m bpo_jax.main stats --data FILE` prints breadth/depth statistics of any data file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bpo_jax.pipeline import STAGES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bpo_jax.main", description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=("all",) + STAGES)
    parser.add_argument("--config", help="YAML run configuration")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.optim.learning_rate=1e-6 (repeatable)")
    parser.add_argument("--data", help="with `stats` and no --config: the data file to describe")
    parser.add_argument("--out", default=None, help="with `stats --data`: where to write the histogram PNG")
    args = parser.parse_args(argv)
    if args.config is None and not (args.stage == "stats" and args.data):
        parser.error("--config is required (or use `stats --data FILE`)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.config is None:
        from bpo_jax.data.stats import write_stats

        out = Path(args.out) if args.out else Path(args.data).with_suffix("").with_name(Path(args.data).stem + "_stats")
        write_stats(args.data, out)  # prints the table
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
