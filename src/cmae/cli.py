"""The ``cmae`` command line: ``cmae <command> [options] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
from cmae.data import shards
from cmae.data.datasets import DataError, list_images
from cmae.eval import features, knn, linprobe
from cmae.interop import export, hf, onnx_export
from cmae.interop.api import load_encoder
from cmae.runtime.checkpoint import CheckpointError
from cmae.runtime.distributed import PeerFailed, is_peer_failure, peer_failure, record_exit
from cmae.runtime.faults import EXIT_PREEMPTED, STOP_SIGNALS, NonFiniteError, Preempted
from cmae.runtime.progress import Progress
from cmae.runtime.runlock import RunDirBusy
from cmae.train import detect, finetune, pretrain, segment
from cmae.viz.plot import MissingDependencyError, plot_run, plot_runs
from cmae.viz.visualize import visualize_files

# the commands that train (cmae.train.lifecycle): they stop on SIGTERM / SIGUSR1 with exit 75
# and the same command resumes
TRAINING_COMMANDS = ("pretrain", "finetune", "segment", "detect")


def _pretrain(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.out is not None:
        overrides.append(f"train.out={args.out}")
    cfg = load_config(args.config, overrides)
    with peer_failures_reported(cfg.train.out, "cmae pretrain"):
        pretrain.run(cfg)


@contextmanager
def peer_failures_reported(run_dir: str, command: str) -> Iterator[None]:
    """Under torchrun: a collective that failed because another rank is gone becomes
    ``PeerFailed``, one line naming that rank and the checkpoint to resume from."""
    try:
        yield
    except RuntimeError as e:  # a failed collective is one (DistError included)
        if not is_peer_failure(e):
            raise
        # torchrun signals the survivors next: nothing is left to save, leave at once
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise peer_failure(e, run_dir, command) from None


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
    overrides = []
    if args.checkpoint is not None:
        overrides.append(f"encoder.checkpoint={json.dumps(args.checkpoint)}")
    if args.data is not None:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.out is not None:
        overrides.append(f"out={json.dumps(args.out)}")
    cfg = load_segment_config(args.config, overrides + list(args.overrides))
    with peer_failures_reported(cfg.out, "cmae segment"):
        segment.run(cfg)


def _add_segment_command(sub) -> None:
    p = sub.add_parser("segment", help="semantic segmentation with UperNet (ADE20K protocol)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint.pt of `cmae pretrain`, an encoder.safetensors, or 'random' "
        "(default: the config's encoder.checkpoint, 'random')",
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
    cfg = load_detect_config(args.config, overrides + list(args.overrides))
    with peer_failures_reported(cfg.out, "cmae detect"):
        detect.run(cfg)


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
    if args.format not in ("hf", "onnx") and (args.pool or args.push_to_hub):
        raise ConfigError("--pool / --push-to-hub: only for --format hf (--pool: onnx too)")
    if args.format == "hf":
        path = hf.export_hf(
            args.checkpoint, args.out, args.img_size, args.branch, args.pool or "cls"
        )
        print(
            f"wrote {path}/ (config.json + model.safetensors); load it with "
            f'timm.create_model("local-dir:{path}", pretrained=True)'
        )
        if args.push_to_hub:
            print(f"pushed to {hf.push_to_hub(path, args.push_to_hub)}")
        return
    if args.format == "onnx":
        if args.branch != "online":
            raise ConfigError(
                "--branch target: export it with --format timm first, then --format onnx from "
                "that file"
            )
        enc = load_encoder(args.checkpoint, args.pool or "cls", img_size=args.img_size)
        path = onnx_export.export_onnx(enc, args.out)
    elif args.format == "timm":
        path, saved_format = export.export_encoder(
            args.checkpoint, args.out, args.img_size, args.branch
        )
        if saved_format == export.FORMAT_CONVVIT:
            print(
                f"wrote {path} ({saved_format}): a ConvViT encoder is not a timm "
                "VisionTransformer, so this is its own state dict (cmae names); load it with "
                "cmae.load_encoder "
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


def _features(args: argparse.Namespace) -> None:
    features.run(
        args.checkpoint,
        args.data,
        args.out,
        args.img_size,
        args.pool,
        args.crop_pct,
        args.batch_size,
        args.workers,
        args.device,
        args.save_every,
    )


def _add_features_command(sub) -> None:
    p = sub.add_parser("features", help="features of a folder of images into one safetensors file")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="anything cmae.load_encoder reads: run dir, checkpoint.pt, *.safetensors, an hf "
        "folder, or a preset name (random weights)",
    )
    p.add_argument(
        "--data", required=True, help="image folder (recursive) or list file (.txt: paths / URLs)"
    )
    p.add_argument("--out", required=True, help="output .safetensors (features, labels, names)")
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input size (default: the pretraining size; the position embedding is resampled)",
    )
    p.add_argument("--pool", choices=("cls", "mean", "tokens"), default="cls")
    p.add_argument(
        "--crop-pct",
        type=float,
        default=1.0,
        help="resize the short side to S / crop_pct, centre crop S (default 1.0)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="data-loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--save-every",
        type=int,
        default=4096,
        help="images per saved chunk in OUT.partial/; a rerun continues after the last one",
    )
    p.set_defaults(func=_features)


def _shards(args: argparse.Namespace) -> None:
    size = shards.parse_size(args.shard_size)
    n = len(list_images(Path(args.src).expanduser())) if Path(args.src).expanduser().is_dir() else 0
    with Progress(n or None, "cmae shards") as bar:
        written = shards.write_shards(args.src, args.out, size, args.prefix, args.seed, bar.update)
    print(
        f"wrote {len(written.urls)} shards, {written.total} images"
        f"{f', {len(written.classes)} classes' if written.classes else ''}: "
        f"--data '{shards.shard_pattern(written)}'"
    )


def _add_shards_command(sub) -> None:
    p = sub.add_parser("shards", help="write WebDataset-format tar shards from an image folder")
    p.add_argument("src", help="image folder (class folders become .cls labels)")
    p.add_argument("out", help="output folder (shards + index.json)")
    p.add_argument("--shard-size", default="256MB", help="bytes per shard, e.g. 256MB, 1GB")
    p.add_argument(
        "--prefix",
        default="shard",
        help="shard file names PREFIX-000000.tar (train / val for the evaluation commands)",
    )
    p.add_argument("--seed", type=int, default=0, help="the seeded order the images go in")
    p.set_defaults(func=_shards)


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
    p.add_argument(
        "checkpoint",
        help="checkpoint.pt of `cmae pretrain` (or an imported one); onnx: anything "
        "cmae.load_encoder reads",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output file (.safetensors; .pth for mae; .onnx), or folder (hf)",
    )
    p.add_argument(
        "--format",
        choices=("timm", "full", "mae", "hf", "onnx"),
        default="timm",
        help="timm: online encoder, timm VisionTransformer names (default; a ConvViT encoder "
        "keeps its own names); full: whole model + config (and OUT.yaml) to continue pretraining; "
        "mae: a .pth with {'model': encoder state dict} in timm names, as MAE released (for "
        "detectron2 ViTDet / mmsegmentation; ViT only); hf: a folder (config.json + "
        "model.safetensors) that timm.create_model('local-dir:OUT', pretrained=True) and the "
        "Hugging Face Hub load (ViT only); onnx: the encoder as ONNX, features out, dynamic batch",
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="timm / hf / onnx: resample pos-embed for this input size",
    )
    p.add_argument(
        "--pool",
        choices=("cls", "mean", "tokens"),
        default=None,
        help="hf / onnx: the features' pooling (default cls; tokens: onnx only)",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="USER/REPO",
        default=None,
        help="hf: upload the folder to this Hugging Face Hub repository (needs cmae[hub] and a "
        "login)",
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
    _add_features_command(sub)
    _add_shards_command(sub)
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
    # a stop signal before a training command installs its own handler (config, data probing,
    # model building) ends the start-up with a message and exit 75, like one during training;
    # the other commands keep the signals' default action
    startup = _stopped_in_startup if args.command in TRAINING_COMMANDS else signal.SIG_DFL
    previous = {s: signal.signal(s, startup) for s in STOP_SIGNALS}
    try:
        return _run(args)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except Preempted as e:  # a stop signal; the state is saved and the message printed
        record_exit(str(e))
        return EXIT_PREEMPTED
    except PeerFailed as e:
        # the exit code of a stop: torchrun restarts the job (--max-restarts), a script reruns
        if e.report:
            _say(f"cmae {args.command}: {e}")
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C: what was saved stays; 128 + SIGINT, as shells report
        training = args.command in TRAINING_COMMANDS
        resume = " (it resumes from the last checkpoint)" if training else ""
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
        record_exit(f"error: {e}")
        _say(f"cmae {args.command}: error: {e}")
        return 2
    return 0


def _say(msg: str) -> None:
    # on its own line, also after a progress bar an error interrupted (tqdm clears it first)
    tqdm.write(msg, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
