"""LaTeX tables of the report, next to the numbers the papers print.

One function per table; each returns a complete ``table`` float (booktabs
rules, caption, label, no preamble) that a paper can ``\\input``. Cells are
built as LaTeX strings and laid out with ``pandas.Styler.to_latex``.

Conventions, the same in every table:
- values are percentages (metrics.json stores fractions);
- several seeds print as mean$\\pm$std (sample std, ddof=1); the caption says
  how many seeds; a row with fewer seeds than configured gets an ``n`` column;
- bold marks a difference that survives seed and image noise: the highest
  mask AP of a table is bold only when the two-level bootstrap interval
  (seeds and val images, reports/bootstrap.py) of its difference to every
  other competing row excludes 0; an ablation's $\\Delta$AP is bold only when
  its interval against the first row excludes 0. Columns without a bootstrap
  (AP50, sizes, VOC-style AP) are never bold, nor is anything when the
  intervals are missing (paper rows never compete);
- a configured run without metrics prints as ``---``, never disappears;
- a row that uses an imported (external) result is marked with a dagger;
- paper values appear only when the runs' setting (dataset, split, backbone,
  schedule) is the paper's; ablation tables on other settings show only the
  paper's *differences*, which are what a small-scale run can reproduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from reports.latex import latex_escape
from sim_core.errors import InputError

PAPER_NUMBERS_PATH = Path(__file__).with_name("paper_numbers.yaml")
COCO_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
VOC_COLUMNS = ("AP", "AP25", "AP50", "AP70", "AP75")
HEADERS = {"AP": "AP", "AP25": "AP$_{25}$", "AP50": "AP$_{50}$", "AP70": "AP$_{70}$",
           "AP75": "AP$_{75}$", "APs": "AP$_S$", "APm": "AP$_M$", "APl": "AP$_L$"}
MISSING = "---"
DAGGER = r"$^{\dagger}$"
SIGNIFICANT = r"$^{\ast}$"


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Setting:
    """What a group of runs was trained and evaluated on; backbone/schedule only for paper profiles."""
    profile: str
    dataset: str
    split: str
    backbone: str | None = None
    schedule: str | None = None

    def describe(self, tex: bool = True) -> str:
        text = f"{self.dataset} {self.split}, profile {self.profile}"
        if self.backbone:
            text += f", {self.backbone} {self.schedule}"
        return latex_escape(text) if tex else text


@dataclass
class RunResult:
    name: str
    seed: int | None
    metrics: dict | None  # None: the run is configured but has no metrics.json

    @property
    def external(self) -> bool:
        return bool(self.metrics and self.metrics.get("external"))


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int


@dataclass
class Row:
    """One table row: the runs (seeds) of one configuration, pooled."""
    label_tex: str
    method: str
    runs: list[RunResult] = field(default_factory=list)
    paper_id: str | None = None
    name: str = ""         # plain text, for bootstrap.json and figures
    compete: bool = True   # False: shown but never bold (the mask-supervised upper bound)

    @property
    def present(self) -> list[RunResult]:
        return [r for r in self.runs if r.metrics is not None]

    @property
    def external(self) -> bool:
        return any(r.external for r in self.present)

    def stat(self, section: str, column: str) -> Stat | None:
        values = []
        for run in self.present:
            value = (run.metrics.get(section) or {}).get(column)
            if value is not None and value >= 0:  # COCO prints -1 when a size range has no GT
                values.append(100.0 * float(value))
        if not values:
            return None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return Stat(float(np.mean(values)), std, len(values))


@dataclass(frozen=True)
class Significance:
    """Two-level bootstrap intervals of AP(rows[i]) - AP(rows[j]) between the rows of one table.

    ``pairs`` maps ``(i, j)`` (indices into the table's rows, both orders) to
    ``(low, high)`` in AP fractions. Bold and marks read only this, so a table
    without intervals (no ground truth, no segm.json) has no bold at all.
    """
    pairs: dict[tuple[int, int], tuple[float, float]]
    confidence: float
    resamples: int
    n_images: int

    @classmethod
    def from_bootstrap(cls, result: dict, index_of: dict[str, int]) -> "Significance":
        """From :func:`reports.bootstrap.paired_bootstrap`'s result and its group keys' row indices."""
        pairs = {}
        for item in result["intervals"]:
            i, j = index_of[item["a"]], index_of[item["b"]]
            low, high = item["two_level"]["low"], item["two_level"]["high"]
            pairs[(i, j)], pairs[(j, i)] = (low, high), (-high, -low)
        return cls(pairs, result["confidence"], result["resamples"], result["n_images"])

    def above(self, i: int, j: int) -> bool:
        """AP(rows[i]) is significantly above AP(rows[j]) (the interval lies above 0)."""
        interval = self.pairs.get((i, j))
        return interval is not None and interval[0] > 0

    def differs(self, i: int, j: int) -> bool:
        """The interval of AP(rows[i]) - AP(rows[j]) excludes 0."""
        return self.above(i, j) or self.above(j, i)


@dataclass(frozen=True)
class PaperEntry:
    id: str
    paper: str
    table: str
    row: str
    method: str
    config: dict
    dataset: str
    split: str
    backbone: str
    schedule: str
    metrics: str
    values: dict
    note: str = ""

    def matches(self, setting: Setting) -> bool:
        return (self.dataset, self.split, self.backbone, self.schedule) == (
            setting.dataset, setting.split, setting.backbone, setting.schedule)


@dataclass
class PaperNumbers:
    papers: dict[str, dict]
    entries: list[PaperEntry]

    def get(self, entry_id: str) -> PaperEntry:
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        raise InputError(PAPER_NUMBERS_PATH, "no such entry", record=entry_id)

    def find(self, method: str, setting: Setting, metrics: str, config: dict | None = None) -> list[PaperEntry]:
        config = config or {}
        return [e for e in self.entries if e.method == method and e.metrics == metrics
                and e.config == config and e.matches(setting)]

    def cite(self, entry: PaperEntry) -> str:
        """Short source tag, e.g. ``SIM T3`` (table numbers only where the source numbers them)."""
        name = _SHORT_NAMES.get(entry.paper, entry.paper)
        return latex_escape(f"{name} T{entry.table}" if entry.table.isdigit() else name)


_SHORT_NAMES = {"sim": "SIM", "boxinst": "BoxInst", "boxlevelset": "BoxLevelSet", "adelaidet": "AdelaiDet"}


def load_paper_numbers(path: str | Path = PAPER_NUMBERS_PATH) -> PaperNumbers:
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    entries = []
    for raw in data.get("entries", []):
        try:
            entry = PaperEntry(**{**raw, "table": str(raw["table"])})
        except TypeError as exc:
            raise InputError(path, f"bad entry fields ({exc})", record=raw.get("id")) from exc
        if entry.paper not in data["papers"]:
            raise InputError(path, f"unknown paper {entry.paper!r}", record=entry.id)
        entries.append(entry)
    ids = [e.id for e in entries]
    if len(ids) != len(set(ids)):
        raise InputError(path, "duplicate entry ids")
    return PaperNumbers(data["papers"], entries)


# ----------------------------------------------------------------------- formatting
def fmt_stat(stat: Stat | None, bold: bool = False) -> str:
    if stat is None:
        return MISSING
    mean = f"{stat.mean:.1f}"
    mean = rf"\textbf{{{mean}}}" if bold else mean
    return f"{mean}$\\pm${stat.std:.1f}" if stat.n > 1 else mean


def fmt_value(value: float | None) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def fmt_delta(value: float | None) -> str:
    if value is None or math.isnan(value):
        return MISSING
    value = round(value, 1) + 0.0  # no "-0.0"
    return f"${value:+.1f}$"


def bold_row(rows: Sequence[Row], significance: Significance | None) -> int | None:
    """Index of the row whose mask AP is bold, or None.

    The competing row with the highest mean AP, if it is the only one at that
    value as printed (one decimal) and its two-level interval against every
    other competing row with a value lies above 0. A table with fewer than two
    competing values, or without an interval for one of these pairs, has no bold.
    """
    if significance is None:
        return None
    means = [(round(s.mean, 1), i) for i, r in enumerate(rows) if r.compete and (s := r.stat("segm", "AP"))]
    if len(means) < 2:
        return None
    means.sort(reverse=True)
    (top, best), (second, _) = means[0], means[1]
    if top == second or not all(significance.above(best, j) for _, j in means[1:]):
        return None
    return best


def _bold(text: str) -> str:
    """Bold a cell that may hold math (signs, brackets) as well as text."""
    return rf"{{\boldmath\textbf{{{text}}}}}"


def _seed_phrase(rows: Sequence[Row]) -> tuple[str, bool]:
    """Caption words for the seeds, and whether an ``n`` column is needed."""
    configured = [len(r.runs) for r in rows]
    need_n = any(len(r.present) != len(r.runs) or not r.runs for r in rows) or len(set(configured)) > 1
    found = [len(r.present) for r in rows if r.present]
    top = max(found, default=0)
    if top <= 1:
        phrase = "single seed per row"
    elif len(set(found)) == 1:
        phrase = rf"mean$\pm$std over {top} seeds"
    else:
        phrase = rf"mean$\pm$std over {min(found)}--{top} seeds per row (column $n$)"
    return phrase, need_n


def _n_cell(row: Row) -> str:
    found, configured = len(row.present), len(row.runs)
    if not configured:
        return MISSING
    return str(found) if found == configured else f"{found}/{configured}"


def _footnotes(rows: Sequence[Row]) -> list[str]:
    notes = []
    if any(r.external for r in rows):
        notes.append(DAGGER + " imported from the original code base's results and "
                     "evaluated by simbench.")
    if any(len(r.present) < len(r.runs) or not r.runs for r in rows):
        notes.append(MISSING + ": not available (run without metrics.json, or not configured).")
    return notes


def render(cells: list[list[str]], header: list[str], caption: str, label: str,
           column_format: str, midrule_after: Sequence[int] = (), footnotes: Sequence[str] = ()) -> str:
    """Lay out pre-formatted LaTeX cells with Styler.to_latex (booktabs rules)."""
    frame = pd.DataFrame(cells, columns=header)
    latex = frame.style.hide(axis="index").to_latex(
        hrules=True, caption=caption, label=label, position="htbp", position_float="centering",
        column_format=column_format, environment="table")
    lines = latex.splitlines()
    body_start = [i for i, line in enumerate(lines) if line.strip() == r"\midrule"][0] + 1
    for offset in sorted(set(midrule_after), reverse=True):
        if 0 <= offset < len(cells) - 1:
            lines.insert(body_start + offset + 1, r"\midrule")
    lines.insert(lines.index(r"\centering") + 1, r"\small")
    if footnotes:
        end = lines.index(r"\end{tabular}") + 1
        lines[end:end] = [r"\par\smallskip{\footnotesize\raggedright " + " ".join(footnotes) + r"\par}"]
    return "\n".join(lines) + "\n"


def _bold_phrase(rows: Sequence[Row], significance: Significance | None) -> str:
    """The bold rule of the AP column, as the caption states it."""
    others = "other row" if all(r.compete for r in rows) else "other row but the mask-supervised upper bound"
    rule = ("Bold: the highest mask AP, only when the two-level bootstrap interval (seeds and validation images) "
            f"of its difference to every {others} excludes 0; other columns are not tested and never bold.")
    if significance is None:
        return rule + " No interval is available for this table, so nothing is bold."
    return rule


def _label(row: Row) -> str:
    return row.label_tex + (DAGGER if row.external else "")


# ---------------------------------------------------------------------------- tables
def comparison_table(rows: Sequence[Row], setting: Setting, paper: PaperNumbers, *, section: str = "segm",
                     marks: Sequence[bool] | None = None, mark_text: str = "", label: str = "tab:main",
                     title: str = "Main comparison", significance: Significance | None = None) -> str:
    """Methods side by side; under each, the paper's value(s) and the difference when comparable.

    ``significance`` holds the two-level intervals between ``rows`` that decide
    the bold AP (:func:`bold_row`); without it nothing is bold.
    """
    columns = COCO_COLUMNS if section == "segm" else VOC_COLUMNS
    paper_key = "segm" if section == "segm" else "voc"
    comparable = setting.backbone is not None
    seeds, need_n = _seed_phrase(rows)
    best = bold_row(rows, significance) if section == "segm" else None
    header = ["Method"] + (["Backbone", "Sched."] if comparable else []) + [HEADERS[c] for c in columns]
    header += ["$n$"] if need_n else []
    cells, rules, any_paper = [], [], False
    for index, row in enumerate(rows):
        lead = [latex_escape(setting.backbone), latex_escape(setting.schedule)] if comparable else []
        stats = {c: row.stat(section, c) for c in columns}
        values = [fmt_stat(stats[c], bold=c == "AP" and index == best) for c in columns]
        if marks is not None and marks[index]:
            values[0] += SIGNIFICANT
        cells.append([_label(row)] + lead + values + ([_n_cell(row)] if need_n else []))
        entries = []
        if comparable:
            entries = [paper.get(row.paper_id)] if row.paper_id else paper.find(row.method, setting, paper_key)
            entries = [e for e in entries if e.matches(setting) and e.metrics == paper_key]
        for entry in entries:
            any_paper = True
            cells.append([rf"\quad\textit{{reported}} ({paper.cite(entry)})", "", ""]
                         + [fmt_value(entry.values.get(c)) for c in columns] + ([""] if need_n else []))
        if entries:  # per column, against the first reported row that prints it
            ref = {c: next((e.values[c] for e in entries if c in e.values), None) for c in columns}
            cells.append([r"\quad $\Delta$ vs.\ reported", "", ""]
                         + [fmt_delta(stats[c].mean - ref[c]) if stats[c] and ref[c] is not None else MISSING
                            for c in columns] + ([""] if need_n else []))
        rules.append(len(cells) - 1)
    metric = "mask AP" if section == "segm" else "VOC-style mask AP"
    bold = _bold_phrase(rows, significance) if section == "segm" else "No bold: the bootstrap tests mask AP only."
    caption = f"{title}: {metric} (\\%) on {setting.describe()}; {seeds}. " + bold
    if any_paper:
        caption += (r" \textit{reported}: the published value; $\Delta$ = reproduced $-$ reported (the first "
                    "reported row that prints the column).")
    elif comparable:
        caption += " No published value for this setting."
    else:
        caption += " Small-scale profile: not comparable with published numbers, which are not shown."
    caption += mark_text
    fmt = "l" + ("ll" if comparable else "") + "r" * len(columns) + ("r" if need_n else "")
    return render(cells, header, caption, label, fmt, rules if any_paper else (), _footnotes(rows))


def ablation_table(rows: Sequence[Row], setting: Setting, paper: PaperNumbers, *, title: str,
                   first_header: str, label: str, significance: Significance | None = None) -> str:
    """An ablation: reproduced columns, AP difference to the first row, and the paper's beside.

    With ``significance`` (two-level intervals between ``rows``), a $\\Delta$AP
    is bold where its interval against the first row excludes 0, and the AP
    column's bold follows :func:`bold_row`.
    """
    columns = COCO_COLUMNS
    entries = [paper.get(r.paper_id) if r.paper_id else None for r in rows]
    absolute = all(e is None or e.matches(setting) for e in entries) and setting.backbone is not None
    seeds, need_n = _seed_phrase(rows)
    best = bold_row(rows, significance)
    base = rows[0].stat("segm", "AP") if rows else None
    base_paper = entries[0].values.get("AP") if entries and entries[0] else None
    header = [first_header] + [HEADERS[c] for c in columns] + [r"$\Delta$AP"]
    header += (["Reported AP"] if absolute else []) + [r"Reported $\Delta$AP"] + (["$n$"] if need_n else [])
    cells = []
    for index, (row, entry) in enumerate(zip(rows, entries)):
        stats = {c: row.stat("segm", c) for c in columns}
        values = [fmt_stat(stats[c], bold=c == "AP" and index == best) for c in columns]
        delta = stats["AP"].mean - base.mean if stats["AP"] and base else None
        delta_cell = fmt_delta(delta)
        if delta is not None and significance is not None and index > 0 and significance.differs(index, 0):
            delta_cell = _bold(delta_cell)
        paper_ap = entry.values.get("AP") if entry else None
        paper_delta = paper_ap - base_paper if paper_ap is not None and base_paper is not None else None
        cells.append([_label(row)] + values + [delta_cell] + ([fmt_value(paper_ap)] if absolute else [])
                     + [fmt_delta(paper_delta)] + ([_n_cell(row)] if need_n else []))
    source = next((e for e in entries if e), None)
    cite = f" Reported: {paper.cite(source)}, {latex_escape(source.dataset)} {latex_escape(source.split)}, " \
           f"{latex_escape(source.backbone)} {latex_escape(source.schedule)}." if source else ""
    caption = (f"{title}: mask AP (\\%) on {setting.describe()}; {seeds}. $\\Delta$AP is relative to the "
               "first row, bold only where its two-level bootstrap interval (seeds and validation images) "
               f"excludes 0. {_bold_phrase(rows, significance)}{cite}")
    if not absolute and source:
        caption += " Different setting from the paper: only its differences are shown."
    fmt = "l" + "r" * (len(header) - 1)
    return render(cells, header, caption, label, fmt, (), _footnotes(rows))


def _interval_text(interval: dict) -> str:
    return f"[${interval['low'] * 100:+.1f}$, ${interval['high'] * 100:+.1f}$]"


def bootstrap_table(intervals: Sequence[dict], resamples: int, n_images: int, confidence: float,
                    label: str = "tab:bootstrap") -> str:
    """Both bootstrap intervals of AP(A) - AP(B), one line per pair of rows.

    ``intervals`` are :func:`reports.bootstrap.paired_bootstrap` items with
    ``table``, ``a_tex``, ``b_tex``, ``n_a``, ``n_b`` (seeds of each row) and
    ``main`` (a main difference: row - reference, row - first row) added; the
    lines of one table are separated by a rule. Bold follows the two-level
    interval only, as everywhere in the report.
    """
    cells, rules = [], []
    for index, item in enumerate(intervals):
        two = item["two_level"]
        excl = two["low"] > 0 or two["high"] < 0
        cells.append([latex_escape(item["table"]), item["a_tex"], item["b_tex"], f"{item['n_a']}/{item['n_b']}",
                      _bold(fmt_delta(item["diff"] * 100)) if excl else fmt_delta(item["diff"] * 100),
                      _interval_text(item["image"]),
                      _bold(_interval_text(two)) if excl else _interval_text(two)])
        if index + 1 < len(intervals) and intervals[index + 1]["table"] != item["table"]:
            rules.append(index)
    pct = f"{confidence * 100:.0f}\\%"
    caption = (f"Paired bootstrap over validation images ({resamples} resamples of {n_images} images): "
               f"AP(A) $-$ AP(B) in points and two {pct} percentile intervals. \\textit{{Images}}: the images "
               "are resampled (the same draw for every row) and each row's seeds are averaged on each resample: "
               "test-set noise for these trained models. \\textit{Seeds + images} (two-level): each resample "
               "also draws each row's seeds with replacement, independently per row: test-set and seed-to-seed "
               "noise. Seeds: number of seeds of A/B; with one seed per row both intervals are equal and neither "
               "sees seed noise, with two seeds the seed draw is coarse (three outcomes per row). Bold: "
               "$\\Delta$AP and the two-level interval where that interval excludes 0. Each table lists its "
               "main differences first (row $-$ reference in the main table, row $-$ first row in an "
               "ablation), then the other pairs.")
    header = ["Table", "A", "B", "Seeds", r"$\Delta$AP", "Images", "Seeds + images"]
    return render(cells, header, caption, label, "lllrrrr", rules)


def paper_table(paper: PaperNumbers, paper_key: str, table: str, label: str) -> str:
    """A published table as recorded in paper_numbers.yaml (the reference the runs aim at)."""
    entries = [e for e in paper.entries if e.paper == paper_key and e.table == table]
    if not entries:
        raise InputError(PAPER_NUMBERS_PATH, f"no entries for {paper_key} table {table}")
    columns = COCO_COLUMNS if entries[0].metrics == "segm" else VOC_COLUMNS
    columns = tuple(c for c in columns if any(c in e.values for e in entries))
    cells, rules = [], []
    for index, entry in enumerate(entries):
        cells.append([latex_escape(entry.backbone), latex_escape(entry.schedule), latex_escape(entry.row)]
                     + [fmt_value(entry.values.get(c)) for c in columns])
        group = (lambda e: e.method) if entry.metrics == "voc" else (lambda e: (e.backbone, e.schedule))
        if index + 1 < len(entries) and group(entries[index + 1]) != group(entry):
            rules.append(index)
    info = paper.papers[paper_key]
    notes = [f"{latex_escape(e.row)}: {latex_escape(e.note)}" for e in entries if e.note]
    caption = (f"Published values: {latex_escape(info['title'])} ({latex_escape(info['venue'])}, "
               f"arXiv:{latex_escape(info['arxiv'])}), Table {latex_escape(table)}; "
               f"{latex_escape(entries[0].dataset)} {latex_escape(entries[0].split)}.")
    header = ["Backbone", "Sched.", "Row"] + [HEADERS[c] for c in columns]
    return render(cells, header, caption, label, "lll" + "r" * len(columns), rules,
                  ["Notes: " + "; ".join(notes)] if notes else [])


# ------------------------------------------------------------------- supervision quality
SQ_COLUMNS = (("precision", "Prec."), ("recall", "Rec."), ("fg_precision", "fg Prec."), ("fg_recall", "fg Rec."),
              ("bg_precision", "bg Prec."), ("bg_recall", "bg Rec."), ("ignored", "Ignored"), ("fg_iou", "fg IoU"),
              ("value", "Other"))


def supervision_quality_table(final: Sequence[tuple[str, int | None, dict[str, float]]],
                              label: str = "tab:supervision-quality") -> str:
    """Final supervision quality per run: one line per (run, family of targets), metrics in columns.

    ``final`` is ``[(run, last iteration, {name: value})]`` with the names the
    losses log (without ``sq/``), values as fractions (printed in %). Columns
    no run has are left out; a metric a family does not have prints as ``---``.
    """
    from reports.plots import family_title, quality_key, quality_sort_key

    present = {quality_key(name)[1] for _, _, values in final for name in values}
    columns = [(key, head) for key, head in SQ_COLUMNS if key in present]
    cells, rules = [], []
    for run, iteration, values in final:
        families: dict[str, dict[str, float]] = {}
        for name in sorted(values, key=quality_sort_key):
            family, metric = quality_key(name)
            families.setdefault(family, {})[metric] = values[name]
        for index, (family, metrics) in enumerate(families.items()):
            lead = [latex_escape(run), "" if iteration is None else str(iteration)] if index == 0 else ["", ""]
            cells.append(lead + [family_title(family)]
                         + [fmt_value(100.0 * metrics[key]) if key in metrics and math.isfinite(metrics[key])
                            else MISSING for key, _ in columns])
        if families:
            rules.append(len(cells) - 1)
    header = ["Run", "Iter.", "Targets"] + [head for _, head in columns]
    caption = ("Supervision quality at the end of training (\\%, mean of the last 10 logged values, one batch "
               "each; Iter. is the last of them), each method's own mask targets against "
               "the ground-truth masks (non-pasted instances, pooled over the pixels or pairs of a batch). "
               "Pairs: neighbour pairs BoxInst's pairwise term keeps as same label (precision; recall among "
               "the in-box pairs that share the GT label). SIM: in-box pseudo labels from $M_S$, $M_I$ and $M$ "
               "with the loss's thresholds (fg $>\\tau_{high}$, bg $<\\tau_{low}$, the rest ignored). "
               "Level set: IoU with the GT mask of the foreground the energy prefers. Runs without "
               "diagnostics (mask, box-as-mask, older runs) are not listed.")
    fmt = "lll" + "r" * len(columns)
    return render(cells, header, caption, label, fmt, rules)


# ------------------------------------------------------------------- original code
def _code_edits(pair: dict) -> list[str]:
    """The fixes and ablations applied to the original code of ``pair``, as its row names them."""
    return ([f"fix {', '.join(pair['fixes'])}"] if pair.get("fixes") else []) + list(pair.get("ablations") or [])


def _delta_with_interval(interval: dict) -> str:
    """``ΔAP [low, high]`` in points, the interval bold where it excludes 0."""
    text = _interval_text(interval)
    excludes_zero = interval["low"] > 0 or interval["high"] < 0
    return fmt_delta(interval["diff"] * 100) + " " + (rf"\textbf{{{text}}}" if excludes_zero else text)


def _pooled_seed_cells(pair: dict, columns: Sequence[str]) -> list[list[str]]:
    """The two lines of a ``pooled`` pair: each side's seed mean ± std, then ΔAP with its two-level interval."""
    cells = []
    edits = _code_edits(pair)
    for runs, code in ((pair["reimplementations"], "simbench"), (pair["originals"], "original code")):
        row = Row(label_tex="", method="", runs=list(runs))
        code_label = ", ".join([code] + (edits if code == "original code" else []) + [f"mean of {len(runs)} seeds"])
        extra = ""
        if code == "original code":
            interval = pair.get("interval")
            if interval is not None:
                extra = _delta_with_interval(interval)
            else:
                a, b = (Row("", "", list(r)).stat("segm", "AP") for r in (pair["originals"], pair["reimplementations"]))
                extra = fmt_delta(a.mean - b.mean) if a is not None and b is not None else MISSING
        cells.append([latex_escape(pair.get("method_name") or "") if code == "simbench" else "",
                      latex_escape(code_label), latex_escape(", ".join(r.name for r in runs))]
                     + [fmt_stat(row.stat("segm", c)) for c in columns] + [extra])
    return cells


def original_code_table(pairs: Sequence[dict], setting: Setting, label: str = "tab:original-code") -> str:
    """Reimplementation vs original code: each upstream run under the simbench run it is compared with.

    ``pairs``: ``[{"title": str, "original": RunResult, "reimplementation":
    RunResult | None, "interval": {"diff", "low", "high"} | None}]``; the
    interval is the paired-bootstrap interval of AP(original) - AP(reimplementation)
    (fractions). Rows of the original code are marked "original code" (with the
    names of the fixes and ablations applied to it, ``pair["fixes"]`` and ``pair["ablations"]``, if any).
    """
    columns = COCO_COLUMNS
    cells, rules, resamples = [], [], None
    pooled_any = False
    for pair in pairs:
        if pair.get("pooled"):
            pooled_any = True
            resamples = pair.get("resamples", resamples)
            cells += _pooled_seed_cells(pair, columns)
            rules.append(len(cells) - 1)
            continue
        reimpl, orig = pair.get("reimplementation"), pair["original"]
        method = latex_escape(pair.get("method_name") or orig.name)
        edits = _code_edits(pair)
        for run, code in ((reimpl, "simbench"), (orig, "original code")):
            code_label = ", ".join([code] + (edits if code == "original code" else []))
            if run is None:
                cells.append([method, latex_escape(code_label), MISSING] + [MISSING] * len(columns) + [""])
                continue
            metrics = (run.metrics or {}).get("segm") or {}
            values = [fmt_value(100.0 * metrics[c]) if metrics.get(c) is not None and metrics[c] >= 0 else MISSING
                      for c in columns]
            extra = ""
            if code == "original code":
                interval = pair.get("interval")
                if interval is not None and reimpl is not None:
                    extra = _delta_with_interval(interval)
                    resamples = pair.get("resamples", resamples)
                elif reimpl is not None and metrics.get("AP") is not None:
                    ref = ((reimpl.metrics or {}).get("segm") or {}).get("AP")
                    extra = fmt_delta(100.0 * (metrics["AP"] - ref)) if ref is not None else MISSING
            cells.append([method if code == "simbench" else "", latex_escape(code_label), latex_escape(run.name)]
                         + values + [extra])
        rules.append(len(cells) - 1)
    caption = (f"Reimplementation vs original code: mask AP (\\%) on {setting.describe()}, simbench's evaluator "
               "for both; rows \\textit{original code} are the authors' code bases trained on the same data "
               "and schedule (\\texttt{simbench upstream}, settings and patches in each run's run.json). "
               r"$\Delta$AP = original $-$ simbench with its paired-bootstrap interval over validation images")
    caption += f" ({resamples} resamples); bold where it excludes 0." if resamples else "; bold where it excludes 0."
    caption += (" A single pair's interval holds each side's trained model fixed: it does not contain the "
                "spread between training seeds.")
    if pooled_any:
        caption += (r" Rows \textit{mean of n seeds} pool the seeds of one comparison (mean$\pm$std) and give "
                    "the two-level interval, which resamples seeds and images.")
    header = ["Method", "Code", "Run"] + [HEADERS[c] for c in columns] + [r"$\Delta$AP [interval]"]
    return render(cells, header, caption, label, "lll" + "r" * len(columns) + "l", rules)


def stale_table(stale: Sequence[tuple[str, float | None, str]], label: str = "tab:stale") -> str:
    """Runs left out of every comparison because their records disagree with the params: run, the mask AP
    its metrics.json holds (not a result of the current settings), and why."""
    cells = [[latex_escape(run), fmt_value(None if ap is None else 100.0 * ap), latex_escape(why)]
             for run, ap, why in stale]
    caption = ("STALE runs, left out of every table above: their model, run record or metrics do not belong to "
               "the current params (\\texttt{simbench status}). The AP is what their metrics.json holds; it is "
               "not a result of the settings this report describes.")
    return render(cells, ["Run", "Recorded AP", "Why stale"], caption, label, "lrp{0.55\\linewidth}")
