"""The ``cmae`` command line: ``cmae <command> [options] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from tqdm import tqdm

from cmae.config import (
    ConfigError,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    load_config,
    load_eval_config,
    load_segment_config,
)
from cmae.config.detect import load_detect_config
from cmae.data.datasets import DataError
from cmae.eval import knn, linprobe
from cmae.interop import export
from cmae.runtime.checkpoint import CheckpointError
from cmae.runtime.faults import EXIT_PREEMPTED, STOP_SIGNALS, NonFiniteError, Preempted
from cmae.runtime.runlock import RunDirBusy
from cmae.train import detect, finetune, pretrain, segment
from cmae.viz.plot import MissingDependencyError, plot_run, plot_runs
from cmae.viz.visualize import visualize_files


def _pretrain(args: argparse.Namespace) -> None:
    # a stop signal before the run installs its own handler (config, data probing, model
    # building) ends the start-up with a message and exit 75, like one during training
    previous = {s: signal.signal(s, _stopped_in_startup) for s in STOP_SIGNALS}
    try:
        overrides = list(args.overrides)
        if args.data is not None:
            overrides.append(f"data.path={args.data}")
        if args.out is not None:
            overrides.append(f"train.out={args.out}")
        pretrain.run(load_config(args.config, overrides))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StoppedInStartup(Exception):
    """A stop signal arrived before training began: nothing to save."""


def _stopped_in_startup(signum: int, frame) -> None:
    raise StoppedInStartup(signal.Signals(signum).name)


EVAL_COMMANDS = {
    "knn": (KnnConfig, knn, "weighted k-NN top-1/top-5 of frozen features"),
    "linprobe": (
        LinprobeConfig,
        linprobe,
        "linear probe on the frozen encoder (fast or MAE protocol)",
    ),
    "finetune": (FinetuneConfig, finetune, "end-to-end fine-tuning (MAE recipe)"),
}


def _evaluate(args: argparse.Namespace) -> None:
    cls, command = EVAL_COMMANDS[args.command][:2]
    # JSON-quoted: a path is a string even where YAML would read it as a number or a bool
    overrides = [f"encoder.checkpoint={json.dumps(args.checkpoint)}"]
    if args.data is not None:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.out is not None:
        overrides.append(f"out={json.dumps(args.out)}")
    cfg = load_eval_config(cls, args.config, overrides + list(args.overrides))
    command.run(cfg)


def _segment(args: argparse.Namespace) -> None:
    overrides = [f"encoder.checkpoint={json.dumps(args.checkpoint)}"]
    if args.data is not None:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.out is not None:
        overrides.append(f"out={json.dumps(args.out)}")
    segment.run(load_segment_config(args.config, overrides + list(args.overrides)))


def _add_segment_command(sub) -> None:
    p = sub.add_parser("segment", help="semantic segmentation with UperNet (ADE20K protocol)")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint.pt of `cmae pretrain`, an encoder.safetensors, or 'random'",
    )
    p.add_argument(
        "--data",
        default=None,
        help="ROOT with images/{training,validation}/ and annotations/{training,validation}/ "
        "(ADE20K layout, optional classes.txt); default: built-in generated data",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/segment)")
    p.add_argument(
        "--config",
        default=None,
        help="preset (ade20k_vit_base, camvid_cpu) or a YAML file, e.g. a previous OUT/config.yaml",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. iters=1000"
    )
    p.set_defaults(func=_segment)


def _detect(args: argparse.Namespace) -> None:
    overrides = []
    if args.checkpoint is not None:
        overrides.append(f"encoder.checkpoint={json.dumps(args.checkpoint)}")
    if args.data is not None:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.out is not None:
        overrides.append(f"out={json.dumps(args.out)}")
    detect.run(load_detect_config(args.config, overrides + list(args.overrides)))


def _add_detect_command(sub) -> None:
    p = sub.add_parser(
        "detect", help="object detection and instance segmentation (ViTDet Mask R-CNN, COCO AP)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint.pt of `cmae pretrain`, an encoder.safetensors, or 'random' (a fresh "
        "encoder of encoder.preset); default: the config's encoder.checkpoint (random)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="ROOT with images/{train,val}/ and annotations/instances_{train,val}.json (COCO "
        "layout, or the 2017 names); default: built-in generated instances",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/detect)")
    p.add_argument(
        "--config",
        default=None,
        help="preset (coco_vit_base, pennfudan_cpu) or a YAML file, e.g. a previous "
        "OUT/config.yaml",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. iters=1000"
    )
    p.set_defaults(func=_detect)


def _export(args: argparse.Namespace) -> None:
    if args.format == "timm":
        path, fmt = export.export_encoder(args.checkpoint, args.out, args.img_size, args.branch)
        if fmt == export.FORMAT_CONVVIT:
            print(
                f"wrote {path} ({fmt}): a ConvViT encoder is not a timm VisionTransformer, so "
                "this is its own state dict (cmae names); load it with cmae.load_encoder "
                "or `cmae knn / linprobe / finetune --checkpoint`"
            )
            return
    elif args.format == "mae":
        if args.img_size is not None:
            raise ConfigError("--img-size: only for --format timm (mae keeps the pretraining size)")
        path = export.export_mae(args.checkpoint, args.out, args.branch)
    elif args.img_size is not None or args.branch != "online":
        raise ConfigError(
            "--img-size / --branch: only for --format timm (a full export keeps the whole model)"
        )
    else:
        path = export.export_full(args.checkpoint, args.out)
    print(f"wrote {path} ({args.format})")


def _import_official(args: argparse.Namespace) -> None:
    result = export.load_official(
        args.file,
        args.layout,
        bgr_to_rgb=args.bgr_to_rgb,
        decoder_heads=args.decoder_heads,
        encoder_heads=args.encoder_heads,
        strict=not args.allow_missing,
    )
    path = export.save_imported(result, args.out, str(args.file))
    print(export.describe_import(result, args.layout, args.bgr_to_rgb))
    print(f"wrote {path}")


def _visualize(args: argparse.Namespace) -> None:
    path = visualize_files(
        args.checkpoint, args.images, args.out, args.max_images, args.seed, args.tile
    )
    print(f"wrote {path}")


def _plot(args: argparse.Namespace) -> None:
    if len(args.run_dir) == 1 and args.x == "step" and args.labels is None:
        print(f"wrote {plot_run(args.run_dir[0], args.out)}")
        return
    out = args.out or "compare.png"
    print(f"wrote {plot_runs(args.run_dir, out, args.x, args.labels)}")


def _add_interop_commands(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint: timm encoder or full pretraining state")
    p.add_argument("checkpoint", help="checkpoint.pt of `cmae pretrain` (or an imported one)")
    p.add_argument("--out", required=True, help="output file (.safetensors; .pth for mae)")
    p.add_argument(
        "--format",
        choices=("timm", "full", "mae"),
        default="timm",
        help="timm: online encoder, timm VisionTransformer names (default; a ConvViT encoder "
        "keeps its own names); full: whole model + config (and OUT.yaml) to continue pretraining; "
        "mae: a .pth with {'model': encoder state dict} in timm names, as MAE released (for "
        "detectron2 ViTDet / mmsegmentation; ViT only)",
    )
    p.add_argument(
        "--img-size", type=int, default=None, help="timm: resample pos-embed for this input size"
    )
    p.add_argument(
        "--branch",
        choices=("online", "target"),
        default="online",
        help="timm / mae: the online encoder (default) or the momentum target encoder (CMAE only)",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser("import-official", help="official MAE / CMAE checkpoint -> cmae checkpoint")
    p.add_argument("file", help="the official .pth")
    p.add_argument("--layout", choices=("mae", "cmae"), required=True)
    p.add_argument("--out", required=True, help="output checkpoint.pt")
    p.add_argument(
        "--bgr-to-rgb",
        action="store_true",
        help="rewrite the patch embeddings for RGB input and the pixel decoder for R,G,B "
        "output (official CMAE trained on B,G,R)",
    )
    p.add_argument(
        "--encoder-heads",
        type=int,
        default=None,
        help="encoder heads (not in the shapes; default: the checkpoint's config, else the "
        "preset's, else width / 64)",
    )
    p.add_argument(
        "--decoder-heads",
        type=int,
        default=None,
        help="decoder heads (default: the checkpoint's config, else 16)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="accept files without some parts (e.g. encoder only); they keep initial values",
    )
    p.set_defaults(func=_import_official)

    p = sub.add_parser("visualize", help="reconstruction grid of a checkpoint on some images")
    p.add_argument("checkpoint", help="checkpoint.pt or a full export (needs the decoder)")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or directories")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--max-images", type=int, default=8, help="rows (default 8)")
    p.add_argument("--seed", type=int, default=0, help="mask and target-view seed")
    p.add_argument("--tile", type=int, default=96, help="tile size in pixels (default 96)")
    p.set_defaults(func=_visualize)

    p = sub.add_parser(
        "plot", help="curves of a run, or kNN / loss of several runs on shared axes (matplotlib)"
    )
    p.add_argument("run_dir", nargs="+", help="run directory (or several) with log.jsonl")
    p.add_argument(
        "--out",
        default=None,
        help="output PNG (default RUN_DIR/curves.png for one run, compare.png for several)",
    )
    p.add_argument(
        "--x",
        choices=["step", "epoch", "wall"],
        default="step",
        help="x axis of a comparison: step, epoch, or training time (equal-wall-time view)",
    )
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    p.set_defaults(func=_plot)


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
    for name, (_, _, help_text) in EVAL_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--checkpoint",
            required=True,
            help="checkpoint.pt of `cmae pretrain`, an encoder.safetensors, or 'random' "
            "(a fresh encoder of encoder.preset, the baseline)",
        )
        p.add_argument(
            "--data",
            default=None,
            help="ROOT with train/ and val/ (or test/) class folders; default: built-in shapes",
        )
        p.add_argument("--out", default=None, help=f"output directory (default: runs/{name})")
        p.add_argument("--config", default=None, help="YAML file, e.g. a previous OUT/config.yaml")
        p.add_argument(
            "overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. k=10"
        )
        p.set_defaults(func=_evaluate)
    _add_segment_command(sub)
    _add_detect_command(sub)
    _add_interop_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides may stand anywhere, also after options
    (``cmae finetune --checkpoint random encoder.preset=tiny --data D epochs=4``), which
    argparse alone refuses once a positional has been read before an option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.func(args)
    except Preempted:  # a stop signal; the state is saved and the message printed
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C: what was saved stays; 128 + SIGINT, as shells report
        resume = " (it resumes from the last checkpoint)" if args.command == "pretrain" else ""
        _say(f"cmae {args.command}: interrupted; run the same command again{resume}")
        return 130
    except StoppedInStartup as e:
        _say(
            f"cmae {args.command}: stopped by {e} during start-up, before training (nothing "
            "to save); run the same command again"
        )
        return EXIT_PREEMPTED
    except (
        ConfigError,
        DataError,
        CheckpointError,
        MissingDependencyError,
        NonFiniteError,
        RunDirBusy,
    ) as e:
        _say(f"cmae {args.command}: error: {e}")
        return 2
    return 0


def _say(msg: str) -> None:
    # on its own line, also after a progress bar an error interrupted (tqdm clears it first)
    tqdm.write(msg, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
