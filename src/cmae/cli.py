"""The ``cmae`` command line: ``cmae <command> [options] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import sys

from cmae.checkpoint import CheckpointError
from cmae.config import ConfigError, load_config
from cmae.data import DataError


def _pretrain(args: argparse.Namespace) -> None:
    from cmae import pretrain

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.out is not None:
        overrides.append(f"train.out={args.out}")
    pretrain.run(load_config(args.config, overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="CMAE (or MAE) pretraining")
    p.add_argument(
        "--config",
        default="quick",
        help="preset name (quick, tiny, mae_tiny, vit_base, ...) or a YAML file (default: quick)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="image directory (ImageFolder layout, recursive); default: built-in generated shapes",
    )
    p.add_argument("--out", default=None, help="run directory (default: train.out of the config)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. train.epochs=5 model.mask_ratio=0.75",
    )
    p.set_defaults(func=_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"cmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
