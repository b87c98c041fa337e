"""Run curves (``cmae plot RUN``) and the end-of-run ``summary.md``.

Curves come from ``RUN/log.jsonl``: losses (total, pixel, contrastive), lr, momentum and the
kNN top-1 of records that carry ``knn_top1``. Drawing needs matplotlib (the ``vis`` extra); it
is imported only here, through its object API, so no global backend is switched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from cmae.data.datasets import DataError

PLOT_SIZE = (1200, 800)  # px of curves.png
LOSSES = (("loss", "total"), ("loss_pixel", "pixel"), ("loss_contrast", "contrastive"))


class MissingDependencyError(RuntimeError):
    """An optional package a feature needs is not installed; the message says how to get it."""


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir).expanduser() / "log.jsonl"
    if not path.is_file():
        raise DataError(f"no log.jsonl in {path.parent} (is it a `cmae pretrain` run directory?)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON line: {e}") from e
    if not records:
        raise DataError(f"{path} is empty: nothing to plot")
    return drop_retrained(records)


def drop_retrained(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the steps that count: a ``resumed_from`` record at step S means the run
    restarted from its step-S checkpoint, so the records after S written before it (by the
    interrupted run, whose later steps were lost and trained again) are dropped."""
    kept: list[dict[str, Any]] = []
    for r in records:
        if "resumed_from" in r and isinstance(r.get("step"), int):
            kept = [
                x for x in kept if not (isinstance(x.get("step"), int) and x["step"] > r["step"])
            ]
        kept.append(r)
    return kept


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a finite number under ``key``."""
    pts = [
        (r["step"], float(r[key]))
        for r in records
        if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def random_init_knn(run_dir: Path) -> float | None:
    """The random-init encoder's kNN top-1 of the run's summary.json, if it has one."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        value = summary["knn_random_init"]["top1"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves of a run to ``out`` (default ``RUN/curves.png``), PLOT_SIZE pixels."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(
            "plotting needs matplotlib: pip install 'cmae[vis]' (or pip install matplotlib)"
        ) from e
    run_dir = Path(run_dir).expanduser()
    records = read_log(run_dir)
    dpi = 100
    fig = Figure(figsize=(PLOT_SIZE[0] / dpi, PLOT_SIZE[1] / dpi), dpi=dpi, layout="constrained")
    ax_loss, ax_lr, ax_m, ax_knn = fig.subplots(2, 2).ravel()
    for key, label in LOSSES:
        x, y = series(records, key)
        if y and any(v != 0 for v in y):  # MAE runs log loss_contrast = 0: leave it out
            ax_loss.plot(x, y, label=label)
    ax_loss.set_title("loss")
    ax_loss.legend(loc="upper right")
    for ax, key, title in ((ax_lr, "lr", "learning rate"), (ax_m, "momentum", "EMA momentum")):
        x, y = series(records, key)
        ax.plot(x, y)
        ax.set_title(title)
    x, y = series(records, "knn_top1")
    baseline = random_init_knn(run_dir)
    if y:
        ax_knn.plot(x, y, marker="o", label="pretrained")
        if baseline is not None:  # the end-of-run check's random-init encoder, for scale
            ax_knn.axhline(baseline, linestyle="--", color="grey", label="random init")
            ax_knn.legend(loc="lower right")
    else:
        ax_knn.text(0.5, 0.5, "no knn_top1 in log.jsonl", ha="center", va="center")
    ax_knn.set_title("kNN top-1 (%)")
    for ax in (ax_loss, ax_lr, ax_m, ax_knn):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir.name))
    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def plot_runs(
    run_dirs: list[str | Path],
    out: str | Path,
    x_axis: str = "step",
    labels: list[str] | None = None,
) -> Path:
    """Several runs on shared axes (kNN top-1, total loss, contrastive loss), one line per run,
    to compare e.g. MAE and CMAE over training length. ``x_axis``: ``step``, ``epoch`` (the
    kNN monitor's epoch + 1; a loss at its step's fraction of the epochs) or ``wall``
    (seconds, from the logged img/s and batch sizes, for equal-wall-time comparisons)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError(
            "plotting needs matplotlib: pip install 'cmae[vis]' (or pip install matplotlib)"
        ) from e
    if x_axis not in ("step", "epoch", "wall"):
        raise ValueError(f"x_axis: expected step, epoch or wall, got {x_axis!r}")
    runs = [Path(r).expanduser() for r in run_dirs]
    names = labels or [r.name for r in runs]
    if len(names) != len(runs):
        raise ValueError(f"{len(names)} labels for {len(runs)} runs")
    dpi = 100
    fig = Figure(
        figsize=(PLOT_SIZE[0] / dpi, PLOT_SIZE[1] / dpi / 2), dpi=dpi, layout="constrained"
    )
    axes = fig.subplots(1, 3)
    panels = (
        ("knn_top1", "kNN top-1 (%)"),
        ("loss", "total loss"),
        ("loss_contrast", "contrastive loss"),
    )
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        records = read_log(run)
        to_x = _x_of(records, x_axis, run)
        for ax, (key, _) in zip(axes, panels, strict=True):
            pts = [(to_x(r), float(r[key])) for r in records if _number(r.get(key))]
            pts = [p for p in pts if p[0] is not None]
            if pts and not (key == "loss_contrast" and all(v == 0 for _, v in pts)):
                xs, ys = zip(*pts, strict=True)
                marker = "o" if key == "knn_top1" else None  # one colour per run in all panels
                ax.plot(xs, ys, label=name, color=f"C{i % 10}", marker=marker)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel({"step": "step", "epoch": "epoch", "wall": "training time (s)"}[x_axis])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def training_seconds(run_dir: str | Path) -> float:
    """A run's training time from its log (the ``--x wall`` axis at its last logged step): all
    of its segments when it was resumed, the kNN monitor's time left out. Unlike the summary's
    ``wall_s``, which covers the last segment only, start-up and monitor included."""
    run = Path(run_dir).expanduser()
    records = read_log(run)
    to_x = _x_of(records, "wall", run)
    return max((x for x in map(to_x, records) if x is not None), default=0.0)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _x_of(records: list[dict[str, Any]], x_axis: str, run: Path):
    """record -> its x value (None when the record has none) for ``plot_runs``."""
    if x_axis == "step":
        return lambda r: r.get("step")
    if x_axis == "epoch":
        # the monitor logs the epoch it ran after; a loss record sits at step / steps-per-epoch,
        # read from the first monitor record (none: the losses have no epoch axis)
        first = next((r for r in records if "knn_top1" in r and _number(r.get("step"))), None)
        per_epoch = first["step"] / (first["epoch"] + 1) if first else None

        def epoch_of(r):
            if "knn_top1" in r:
                return r["epoch"] + 1
            return r["step"] / per_epoch if per_epoch and _number(r.get("step")) else None

        return epoch_of
    cfg_file = run / "config.yaml"
    batch = (
        yaml.safe_load(cfg_file.read_text())["train"]["batch_size"] if cfg_file.is_file() else None
    )
    if batch is None:
        raise DataError(f"{run}: --x wall needs config.yaml (the batch size) beside log.jsonl")
    # training seconds up to each logged step, from the logged img/s. An interval that spans a
    # kNN record is timed at the rate before it: in logs written before the monitor's time was
    # kept out of img/s, that interval's rate includes the monitor, which is not training
    wall, last, rate, at, spans_monitor = 0.0, 0, None, {}, False
    for r in records:
        speed = r.get("img_per_s")
        if _number(speed) and speed > 0 and isinstance(r.get("step"), int):
            rate = rate if spans_monitor and rate is not None else speed
            wall += (r["step"] - last) * batch / rate
            last, spans_monitor = r["step"], False
        elif "knn_top1" in r:
            spans_monitor = True
        if isinstance(r.get("step"), int):
            at.setdefault(r["step"], wall)
    return lambda r: at.get(r.get("step"))


def write_summary(
    run_dir: str | Path,
    config: dict[str, Any],
    summary: dict[str, Any],
    recon_png: Path | None = None,
) -> Path:
    """``RUN/summary.md``: what ran, how fast, final losses, kNN, links to the pictures.

    Draws ``curves.png`` first when matplotlib is installed (else says how to get it).
    """
    run_dir = Path(run_dir)
    m, t = config.get("model", {}), config.get("train", {})
    lines = [
        f"# Run summary: {run_dir.name}",
        "",
        f"- model: {m.get('method')} {m.get('encoder')}, {m.get('img_size')} px, "
        f"patch {m.get('patch_size')}",
        f"- data: {config.get('data', {}).get('path') or 'built-in generated shapes'}",
        f"- steps: {summary.get('steps')}, batch {t.get('batch_size')}",
    ]
    if "wall_s" in summary:
        lines.append(f"- wall time: {summary['wall_s']:.1f} s")
    if "img_per_s" in summary:
        lines.append(f"- throughput: {summary['img_per_s']:.1f} images/s")
    losses = [
        f"{label} {summary[key]:.4f}"
        for key, label in LOSSES
        if isinstance(summary.get(key), float)
    ]
    if losses:
        lines.append(f"- final losses: {', '.join(losses)}")
    knn, knn0 = summary.get("knn"), summary.get("knn_random_init")
    if isinstance(knn, dict) and "top1" in knn:
        vs = f" (random init {knn0['top1']:.2f} %)" if isinstance(knn0, dict) else ""
        lines.append(f"- kNN top-1 at the end: {knn['top1']:.2f} %{vs}")
    try:
        records = read_log(run_dir)
    except DataError:
        records = []  # the summary must not fail the run that just finished
    _, knn_log = series(records, "knn_top1")
    if knn_log:
        lines.append(f"- kNN top-1 during training: last {knn_log[-1]:.2f} %")
    lines += ["", "## Pictures", ""]
    curves = None
    if records:
        try:
            curves = plot_run(run_dir)
        except MissingDependencyError:
            pass  # a summary without curves is still a summary
    if curves is not None:
        lines.append(f"![curves]({curves.name})")
    else:
        lines.append(
            "(curves: install matplotlib, `pip install 'cmae[vis]'`, then `cmae plot RUN`)"
        )
    if recon_png is not None:
        lines += ["", f"![reconstructions]({Path(recon_png).name})"]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip()]
    lines += ["```", ""]
    out = run_dir / "summary.md"
    out.write_text("\n".join(lines))
    return out


def dense_curves(
    records: list[dict[str, Any]],
    path: Path,
    title: str,
    losses: tuple[str, ...],
    metrics: tuple[tuple[str, str], ...],
    metric_title: str,
) -> Path | None:
    """``path``: a dense-task run's training ``losses`` (the first drawn thicker) and its
    validation ``metrics`` ((key, matplotlib style) pairs, from the ``"eval"`` records) against
    the iteration, from its log records; None (nothing drawn) without matplotlib (the ``vis``
    extra), which a run does not need."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key in losses:
        pts = [(r["step"], r[key]) for r in records if key in r and "eval" not in r]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), label=key, linewidth=2 if key == losses[0] else 1)
    evals = [r for r in records if r.get("eval")]
    for key, style in metrics:
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax_metric.plot(*zip(*pts, strict=True), style, label=key.replace("_", " "))
    ax_loss.set_title("training losses")
    ax_metric.set_title(metric_title)
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path)
    return path
