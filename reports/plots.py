"""Figures of the report: training curves, supervision quality, AP by object size, ablation differences.

Each figure is written twice, as PDF (vector, for LaTeX) and PNG (for a quick
look and for ``dvc plots``), through an atomic write. Colours are fixed per
method so that every figure of the report uses the same colour for a method.

Training curves come from ``train_log.jsonl`` (one json object per logged
iteration, all loss terms) and, when a run has no such file, from the
dvclive history files ``dvclive/plots/metrics/**/<name>.tsv`` (columns
``step`` and ``<name>``). A resumed run may log an iteration twice; the last
record wins. The curves are drawn with a trailing moving average whose window
is ``report.curve_smoothing`` logged points (1 = raw).

Supervision-quality diagnostics are the ``sq/<name>`` columns of the same
log (dvclive: ``train/sq/<name>.tsv``); :func:`quality_key` splits a name
into its family (whose targets: ``pair``, ``MS``, ``MI``, ``M``,
``levelset_img`` ...) and its metric (``precision``, ``fg_recall``, ``fg_iou`` ...).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sim_core.errors import InputError  # noqa: E402
from sim_core.io_utils import atomic_write_bytes  # noqa: E402

_EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
TOTAL_NAMES = ("loss", "total_loss", "loss_total")
DETECTION_TERMS = {"loss_cls", "loss_box", "loss_bbox", "loss_giou", "loss_reg", "loss_ctr",
                   "loss_centerness", "loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}
LINESTYLES = ("-", "--", ":", "-.")
SQ_PREFIX = "sq/"
# metric suffixes of the supervision-quality names, longest match first
SQ_METRICS = ("fg_precision", "fg_recall", "bg_precision", "bg_recall", "ignored", "fg_iou",
              "precision", "recall")
SQ_METRIC_TITLES = {"precision": "precision", "recall": "recall", "fg_precision": "fg precision",
                    "fg_recall": "fg recall", "bg_precision": "bg precision", "bg_recall": "bg recall",
                    "ignored": "ignored fraction", "fg_iou": "fg IoU", "value": "value"}
SQ_FAMILY_TITLES = {"pair": "BoxInst pairs", "MS": "SIM $M_S$", "MI": "SIM $M_I$", "M": "SIM $M$",
                    "levelset_img": "level set, image", "levelset_feat": "level set, features"}
SQ_FAMILY_ORDER = ("pair", "MS", "MI", "M", "levelset_img", "levelset_feat")


def method_color(method: str) -> str:
    """The method's colour (``sim_core.methods``); a stable one of a few spare colours for any other name."""
    from sim_core.errors import InputError
    from sim_core.methods import get_method

    try:
        return get_method(method).color
    except InputError:
        return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem.pdf`` and ``stem.png`` atomically and close the figure."""
    paths = []
    for ext, meta in (("pdf", {"CreationDate": None}), ("png", {"Software": None})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150, metadata=meta)
        path = Path(f"{stem}.{ext}")
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- curves
def read_train_log(path: Path) -> pd.DataFrame:
    """Records of train_log.jsonl indexed by iteration; a truncated last line (killed run) is skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise InputError(path, f"not a json object ({exc.msg})", record=f"line {number}") from exc
        if not isinstance(record, dict) or "iteration" not in record:
            raise InputError(path, "a record needs an 'iteration' field", record=f"line {number}")
        records.append(record)
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame.from_records(records).drop_duplicates("iteration", keep="last")
    return frame.set_index("iteration").sort_index()


def read_dvclive(directory: Path) -> pd.DataFrame:
    """dvclive metric histories (plots/metrics/**/*.tsv) joined on ``step``."""
    columns = {}
    for tsv in sorted((directory / "plots" / "metrics").rglob("*.tsv")):
        table = pd.read_csv(tsv, sep="\t")
        name = tsv.stem
        if "step" not in table or name not in table:
            raise InputError(tsv, f"expected columns 'step' and '{name}'")
        key = SQ_PREFIX + name if tsv.parent.name == SQ_PREFIX.rstrip("/") else name
        columns[key] = table.drop_duplicates("step", keep="last").set_index("step")[name]
    return pd.DataFrame(columns).sort_index() if columns else pd.DataFrame()


def load_curves(run_dir: Path) -> pd.DataFrame | None:
    """Loss history of a run, or None when it has neither train_log.jsonl nor dvclive files."""
    log = run_dir / "train_log.jsonl"
    if log.exists():
        frame = read_train_log(log)
    elif (run_dir / "dvclive").is_dir():
        frame = read_dvclive(run_dir / "dvclive")
    else:
        return None
    return frame if not frame.empty else None


def total_loss(frame: pd.DataFrame) -> pd.Series:
    for name in TOTAL_NAMES:
        if name in frame:
            return frame[name]
    terms = [c for c in frame.columns if str(c).startswith("loss_")]
    return frame[terms].sum(axis=1, min_count=1)


def mask_terms(frame: pd.DataFrame) -> list[str]:
    """Loss terms other than the total and the (identical for all methods) detection losses."""
    return [c for c in frame.columns if str(c).startswith("loss_") and c not in TOTAL_NAMES
            and c not in DETECTION_TERMS and "fcos" not in c and "centerness" not in c]


def quality_key(name: str) -> tuple[str, str]:
    """``sq/MS_fg_recall`` (or ``MS_fg_recall``) -> ``("MS", "fg_recall")``; unknown metrics -> ``(name, "value")``."""
    name = name[len(SQ_PREFIX):] if name.startswith(SQ_PREFIX) else name
    for metric in SQ_METRICS:
        if name == metric:
            return "", metric
        if name.endswith("_" + metric):
            return name[:-len(metric) - 1], metric
    return name, "value"


def quality_columns(frame: pd.DataFrame) -> list[str]:
    """The ``sq/...`` columns of a log frame, in family then metric order."""
    cols = [c for c in frame.columns if str(c).startswith(SQ_PREFIX)]
    return sorted(cols, key=quality_sort_key)


def quality_sort_key(name: str) -> tuple:
    family, metric = quality_key(name)
    fam = SQ_FAMILY_ORDER.index(family) if family in SQ_FAMILY_ORDER else len(SQ_FAMILY_ORDER)
    met = SQ_METRICS.index(metric) if metric in SQ_METRICS else len(SQ_METRICS)
    return fam, family, met, metric


def family_title(family: str) -> str:
    return SQ_FAMILY_TITLES.get(family, family.replace("_", " ") or "targets")


FINAL_WINDOW = 10  # logged values averaged into a run's final supervision quality


def final_quality(frame: pd.DataFrame, window: int = FINAL_WINDOW) -> tuple[int | None, dict[str, float]]:
    """Final value of every ``sq/`` column (without the prefix) and the last iteration with any.

    The mean of the last ``window`` logged values, because each logged value
    scores one batch (8 images in the demo), which moves by several points
    from one log to the next.
    """
    out: dict[str, float] = {}
    last = None
    for column in quality_columns(frame):
        series = frame[column].dropna()
        if series.empty:
            continue
        out[column[len(SQ_PREFIX):]] = float(series.iloc[-window:].mean())
        last = max(last or 0, int(series.index[-1]))
    return last, out


def plot_supervision_quality(curves: Mapping[str, tuple[str, pd.DataFrame]], stem: Path,
                             smooth: int = 1) -> list[Path] | None:
    """Supervision quality over training: one row of panels per family of targets, one panel
    per metric, one line per run (coloured by method). None when no run logged ``sq/`` keys."""
    columns = sorted({c for _, frame in curves.values() for c in quality_columns(frame)}, key=quality_sort_key)
    if not columns:
        return None
    families: dict[str, list[str]] = {}
    for column in columns:
        families.setdefault(quality_key(column)[0], []).append(column)
    ncols = max(len(v) for v in families.values())
    nrows = len(families)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.1 * nrows), squeeze=False)
    seen: dict[str, int] = {}
    styles = {}
    for run, (method, _) in curves.items():
        styles[run] = LINESTYLES[seen.setdefault(method, 0) % len(LINESTYLES)]
        seen[method] += 1
    handles: dict[str, object] = {}
    for row, (family, names) in enumerate(families.items()):
        for col in range(ncols):
            ax = axes[row, col]
            if col >= len(names):
                ax.axis("off")
                continue
            column = names[col]
            for run, (method, frame) in curves.items():
                series = frame.get(column)
                if series is None or series.dropna().empty:
                    continue
                series = series.dropna().rolling(max(1, smooth), min_periods=1).mean()
                (line,) = ax.plot(series.index, 100.0 * series.values, styles[run], color=method_color(method),
                                  lw=1.2, label=run)
                handles.setdefault(run, line)
            ax.set_title(f"{family_title(family)}: {SQ_METRIC_TITLES[quality_key(column)[1]]}", fontsize=8)
            ax.set_ylim(-2, 102)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.set_xlabel("iteration", fontsize=7)
            if col == 0:
                ax.set_ylabel("%", fontsize=7)
    legend_rows = int(np.ceil(len(handles) / 5))
    bottom = min(0.4, 0.2 * legend_rows / fig.get_figheight()) if handles else 0.0
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)),
                   fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return save_figure(fig, stem)


def plot_training_curves(curves: Mapping[str, tuple[str, pd.DataFrame]], stem: Path,
                         smooth: int = 1) -> list[Path]:
    """Total loss and each mask-loss term vs iteration; one line per run, coloured by method."""
    terms = sorted({t for _, frame in curves.values() for t in mask_terms(frame)})
    panels = ["total loss"] + terms
    ncols = min(3, len(panels))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.4 * nrows), squeeze=False)
    seen: dict[str, int] = {}
    for run, (method, frame) in curves.items():
        style = LINESTYLES[seen.setdefault(method, 0) % len(LINESTYLES)]
        seen[method] += 1
        for ax, panel in zip(axes.flat, panels):
            series = total_loss(frame) if panel == "total loss" else frame.get(panel)
            if series is None or series.dropna().empty:
                continue
            series = series.dropna().rolling(max(1, smooth), min_periods=1).mean()
            ax.plot(series.index, series.values, style, color=method_color(method), lw=1.2, label=run)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    legend_rows = int(np.ceil(len(labels) / 5))
    bottom = min(0.4, 0.2 * legend_rows / fig.get_figheight()) if handles else 0.0
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return save_figure(fig, stem)


# ------------------------------------------------------------------------------- bars
def plot_ap_by_size(bars: Sequence[tuple[str, str, Mapping[str, tuple[float, float] | None]]],
                    stem: Path, title: str) -> list[Path]:
    """Grouped bars AP_S / AP_M / AP_L per method; ``bars`` = (label, method, {col: (mean, std)})."""
    sizes = (("APs", "small"), ("APm", "medium"), ("APl", "large"))
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(sizes))
    for index, (label, method, values) in enumerate(bars):
        pos = x - 0.4 + width * (index + 0.5)
        means = [values.get(c)[0] if values.get(c) else np.nan for c, _ in sizes]
        stds = [values.get(c)[1] if values.get(c) else 0.0 for c, _ in sizes]
        ax.bar(pos, np.nan_to_num(means), width, yerr=stds, capsize=2, label=label,
               color=method_color(method), edgecolor="black", linewidth=0.4)
        for p, m in zip(pos, means):
            if np.isnan(m):
                ax.text(p, 0, "n/a", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [name for _, name in sizes])
    ax.set_ylabel("mask AP (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=8, frameon=False, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.7, 1))
    return save_figure(fig, stem)


@dataclass
class AblationPanel:
    title: str
    labels: list[str]
    reproduced: list[float | None]  # AP difference to the first row, points
    reported: list[float | None]    # the paper's difference, points


def plot_ablation_deltas(panels: Sequence[AblationPanel], stem: Path) -> list[Path]:
    """Per ablation, reproduced AP differences (to the first row) beside the paper's."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.0), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        x = np.arange(len(panel.labels))
        for offset, values, name, color, hatch in ((-0.2, panel.reproduced, "reproduced", "#d62728", ""),
                                                   (0.2, panel.reported, "reported", "#bbbbbb", "//")):
            heights = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.bar(x + offset, np.nan_to_num(heights), 0.4, label=name, color=color, hatch=hatch,
                   edgecolor="black", linewidth=0.4)
            for xi, h in zip(x + offset, heights):
                ax.text(xi, 0 if np.isnan(h) else h, "n/a" if np.isnan(h) else f"{h:+.1f}",
                        ha="center", va="bottom" if np.isnan(h) or h >= 0 else "top", fontsize=6)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, panel.labels, fontsize=7, rotation=20, ha="right")
        ax.set_ylabel(r"$\Delta$AP vs first row (points)")
        ax.set_title(panel.title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return save_figure(fig, stem)
