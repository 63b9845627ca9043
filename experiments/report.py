"""``simbench report``: tables, figures, bootstrap intervals and report.pdf from finished runs.

Reads only ``runs/<run>/{metrics.json, segm.json, train_log.jsonl, dvclive/}``,
the evaluated split's ``<data_dir>/<split>.json`` and ``images/``, and
``reports/paper_numbers.yaml``; never trains or predicts. Writes
``<out>/{tables/*.tex, figures/*.pdf|png, report.tex, report.pdf,
bootstrap.json}`` as one atomic directory. Missing metrics print as ``---``.
Runs whose ``train_log.jsonl`` has supervision-quality keys (``sq/<name>``) get
the figure "supervision quality over training" and a table of final values.

Every pair of rows of a table gets two paired-bootstrap intervals of the mask-AP
difference (reports/bootstrap.py, docs/statistics.md): ``image`` (val images
resampled, each row's seeds averaged) and ``two_level`` (seeds and val images
resampled). Bold and the main table's marks follow the two-level interval
only; the bootstrap table prints both, a table's main differences first (row -
``bootstrap_reference`` in the main table, row - first row in an ablation).

Runs are grouped by the (profile, dataset, split) of their metrics.json; each group
has its own tables, so small-scale runs never share a table with published numbers.
A row pools the seeds of one configuration: the runs whose ``runs`` entry
(``{method, seed, set: {dotted.key: value}}``, ``set`` lifted to the top level),
without ``seed``, equals one of the row's ``match`` dicts, or the runs it names.
Relative ``data_dirs`` are relative to the parent of the runs directory.

params.yaml ``report`` section (every key optional; the defaults are below):

    report:
      data_dirs: {synthetic: data/synthetic, coco128: data/coco128, coco: data/coco, voc: data/voc}
      paper_settings: {}          # profile -> {backbone: R-50-FPN, schedule: 1x}: the paper setting
                                  # a profile reproduces; only those groups show published values
      main:                       # rows of the main comparison (default: one row per method whose
        - {label: BoxInst, match: {method: boxinst}}    # runs have no overrides)
      components:                 # SIM Table 3 (default shown in DEFAULT_ABLATIONS)
        - {label_tex: "+ $\\mathcal{L}_{pseudo}$", match: {method: sim, sim.copy_paste: false},
           paper: sim_t3_pseudo}
      alpha: [...]                # SIM Table 4: alpha in 0, 0.3, 0.5 (= plain sim), 0.7, 1
      prototypes: [...]           # SIM Table 5: num_prototypes in 1, 5, 10 (= plain sim), 50
      bootstrap_resamples: 1000
      bootstrap_seed: 0
      bootstrap_confidence: 0.95
      bootstrap_reference: sim    # main-table rows are marked when the two-level interval of
                                  # AP(row) - AP(this method) excludes 0
      qualitative_image_ids: []   # empty: the qualitative_count images with most GT instances
      qualitative_count: 4
      qualitative_score_thresh: 0.3
      qualitative_max_dets: 20
      qualitative_methods: [boxmask, boxinst, boxlevelset, sim, mask]
      curve_smoothing: 10         # trailing moving average over logged points (1 = raw)

A row is ``{label | label_tex, match: dict | [dict, ...] | runs: [names], paper: entry id, compete: bool}``;
``compete: false`` keeps a row out of the bold "best" (default: the method's ``competes``, false for ``mask``).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

from reports import bootstrap, latex, plots, qualitative, tables
from reports.tables import Row, RunResult, Setting
from sim_core.data.validate import check_results, load_gt, read_json
from sim_core.errors import InputError
from sim_core.evaluation.coco_eval import make_gt_api
from sim_core.evaluation.results import normalise_results
from sim_core.io_utils import atomic_directory, atomic_write_json, atomic_write_text
from sim_core.methods import get_method

_PSEUDO, _PASTE = r"$\mathcal{L}_{pseudo}$", r"$\mathcal{L}_{paste}$"
DEFAULT_ABLATIONS: dict[str, list[dict]] = {
    "components": [
        {"label": "BoxInst", "match": {"method": "boxinst"}, "paper": "sim_t3_boxinst"},
        {"label_tex": f"+ {_PSEUDO}", "match": {"method": "sim", "sim.copy_paste": False}, "paper": "sim_t3_pseudo"},
        {"label_tex": f"+ {_PSEUDO} + {_PASTE}", "match": {"method": "sim"}, "paper": "sim_t3_pseudo_paste"}],
    "alpha": [{"label": f"{a:g}", "match": [{"method": "sim", "sim.alpha": a}] + [{"method": "sim"}] * (a == 0.5),
               "paper": f"sim_t4_alpha_{a:g}"} for a in (0.0, 0.3, 0.5, 0.7, 1.0)],
    "prototypes": [{"label": str(n), "match": [{"method": "sim", "sim.num_prototypes": n}] + [{"method": "sim"}]
                    * (n == 10), "paper": f"sim_t5_prototypes_{n}"} for n in (1, 5, 10, 50)],
}
ABLATION_TITLES = {"components": ("SIM components (Table 3)", "Setting"),
                   "alpha": (r"Semantic vs.\ instance map, $\alpha$ (Table 4)", r"$\alpha$"),
                   "prototypes": ("Prototypes per class $L$ (Table 5)", "$L$")}
DEFAULTS: dict[str, Any] = {
    "data_dirs": {"synthetic": "data/synthetic", "coco128": "data/coco128", "coco": "data/coco", "voc": "data/voc"},
    "paper_settings": {}, "bootstrap_resamples": 1000, "bootstrap_seed": 0, "bootstrap_confidence": 0.95,
    "bootstrap_reference": "sim", "qualitative_image_ids": [], "qualitative_count": 4,
    "qualitative_score_thresh": 0.3, "qualitative_max_dets": 20,
    "qualitative_methods": ["boxmask", "boxinst", "boxlevelset", "sim", "mask"], "curve_smoothing": 10,
}
INTERVAL_KINDS = {  # written into bootstrap.json so the file explains its intervals
    "image": "val images resampled with replacement (one draw for all rows); each row's seeds averaged on each "
             "resample: test-set noise with the trained models fixed",
    "two_level": "val images resampled as for `image`, and each row's seeds drawn with replacement "
                 "(independently per row); AP = mean over the drawn seeds of each one's AP on the drawn images: "
                 "test-set and seed-to-seed noise; equal to `image` for a row pair with one seed each",
}
ROW_KEYS = {"label", "label_tex", "match", "runs", "paper", "compete"}
IGNORED_KEYS = {"seed"}  # not part of a row's configuration


# ----------------------------------------------------------------------------- params
def flatten(spec: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def report_config(params: dict) -> dict:
    section = params.get("report") or {}
    if not isinstance(section, dict):
        raise InputError("params.yaml", "`report` must be a mapping")
    unknown = set(section) - set(DEFAULTS) - {"main", *DEFAULT_ABLATIONS}
    if unknown:
        raise InputError("params.yaml", f"unknown report keys: {sorted(unknown)}")
    config = {**copy.deepcopy(DEFAULTS), **{k: v for k, v in section.items() if v is not None}}
    for name in ("main", *DEFAULT_ABLATIONS):
        rows = config.get(name, DEFAULT_ABLATIONS.get(name))
        if rows is not None and (not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows)):
            raise InputError("params.yaml", f"report.{name} must be a list of row mappings")
        for row in rows or []:
            if set(row) - ROW_KEYS or not ({"label", "label_tex"} & set(row)) or not ({"match", "runs"} & set(row)):
                raise InputError("params.yaml", f"report.{name}: a row needs label/label_tex and match/runs, "
                                 f"keys {sorted(ROW_KEYS)}", record=str(row))
    return config


def run_specs(params: dict) -> dict[str, dict]:
    runs = params.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise InputError("params.yaml", "`runs` must map run names to {method, seed, overrides}")
    specs = {}
    for name, spec in runs.items():
        if not isinstance(spec, dict) or "method" not in spec or not isinstance(spec.get("set") or {}, dict):
            raise InputError("params.yaml", "a run needs a `method` (and `set` maps keys to values)",
                             record=f"runs.{name}")
        specs[str(name)] = {**flatten({k: v for k, v in spec.items() if k != "set"}), **flatten(spec.get("set") or {})}
    return specs


# ---------------------------------------------------------------------------- loading
def load_metrics(path: Path, run: str) -> dict | None:
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid json ({exc.msg})", record=run) from exc
    if not isinstance(metrics, dict) or not isinstance(metrics.get("segm"), dict):
        raise InputError(path, "needs a `segm` mapping of AP values", record=run)
    for section in ("segm", "bbox", "voc"):
        for key, value in (metrics.get(section) or {}).items():
            if value is None:  # undefined (e.g. no GT of that size): shown as missing
                continue
            if not isinstance(value, (int, float)) or not (value == -1 or 0 <= value <= 1):
                raise InputError(path, f"{section}.{key} must be a fraction in [0, 1], -1 or null, got {value!r}",
                                 record=run)
    return metrics


def build_rows(specs: dict[str, dict], results: dict[str, RunResult], row_specs: list[dict]) -> list[Row]:
    rows = []
    for spec in row_specs:
        if "runs" in spec:
            names = [n for n in spec["runs"] if n in specs]
            missing = [n for n in spec["runs"] if n not in specs]
            if missing:
                raise InputError("params.yaml", f"report rows name runs not in `runs`: {missing}")
        else:
            wanted = [flatten(o) for o in (spec["match"] if isinstance(spec["match"], list) else [spec["match"]])]
            names = [n for n, s in specs.items() if _identity(s) in wanted]
        names.sort(key=lambda n: (specs[n].get("seed") is None, specs[n].get("seed", 0), n))
        if names:
            method = specs[names[0]]["method"]
        else:
            first = spec.get("match") or {}
            method = str(flatten(first if isinstance(first, dict) else first[0]).get("method", ""))
        label = spec.get("label_tex") or latex.latex_escape(spec["label"])
        name = spec.get("label") or re.sub(r"[\\${}]|mathcal", "", spec["label_tex"])
        rows.append(Row(label, method, [results[n] for n in names], spec.get("paper"), name=name,
                        compete=bool(spec.get("compete", competes(method)))))
    return rows


def display_name(method: str) -> str:
    """A method's label in tables and figures (``sim_core.methods``; the name itself when unknown)."""
    try:
        return get_method(method).display_name
    except InputError:
        return method


def competes(method: str) -> bool:
    """Whether a method's row can be a table's bold best (an upper bound cannot)."""
    try:
        return get_method(method).competes
    except InputError:
        return True


def _identity(spec: dict) -> dict:
    """What makes runs the same configuration: the run entry without its seed."""
    return {k: v for k, v in spec.items() if k not in IGNORED_KEYS}


def default_main_rows(specs: dict[str, dict]) -> list[dict]:
    plain = [s["method"] for s in specs.values() if set(_identity(s)) == {"method"}]
    methods = sorted(set(plain), key=lambda m: (get_method(m).order, m))
    return [{"label": get_method(m).display_name, "match": {"method": m}} for m in methods]


def group_of(result: RunResult) -> tuple[str, str, str]:
    m = result.metrics or {}
    return str(m.get("profile", "unknown")), str(m.get("dataset", "unknown")), str(m.get("split", "val"))


def rows_for_group(rows: list[Row], group: tuple[str, str, str]) -> list[Row]:
    """The rows with runs in this group (missing runs kept as ``---``), sliced to those runs."""
    out = []
    for row in rows:
        runs = [r for r in row.runs if r.metrics is None or group_of(r) == group]
        if row.runs and not any(r.metrics is not None for r in runs) and any(r.metrics for r in row.runs):
            continue  # all of this row's results belong to another group
        out.append(Row(row.label_tex, row.method, runs, row.paper_id, name=row.name, compete=row.compete))
    return out


# ------------------------------------------------------------------------ the report
class _Report:
    """Collects the files of one report in ``root`` (the temporary output directory)."""

    def __init__(self, root: Path, config: dict, paper: tables.PaperNumbers, runs_dir: Path):
        self.root, self.config, self.paper, self.runs_dir = root, config, paper, runs_dir
        self.project = runs_dir.resolve().parent  # relative data_dirs are relative to the project root
        self.notes, self.sections, self.boot_json = [], [], []  # LaTeX lines, report.tex sections, json
        self._evals: dict[str, bootstrap.PerImageEval | None] = {}

    def table(self, name: str, text: str) -> str:  # returns the path report.tex inputs
        atomic_write_text(self.root / "tables" / f"{name}.tex", text)
        return f"tables/{name}.tex"

    def figure(self, paths: list[Path], caption: str, width: float = 0.9) -> dict:
        pdf = [p for p in paths if p.suffix == ".pdf"][0]
        return {"path": pdf.relative_to(self.root).as_posix(), "caption": caption, "width": width}

    def _per_image(self, run: RunResult, gt) -> bootstrap.PerImageEval | None:
        if run.name not in self._evals:
            path = self.runs_dir / run.name / "segm.json"
            if not path.exists():
                self.notes.append(f"run {latex.latex_escape(run.name)}: no segm.json, left out of the bootstrap.")
                self._evals[run.name] = None
            else:
                results = _checked_segm(path, gt)
                self._evals[run.name] = bootstrap.evaluate_per_image(gt, results, where=str(path))
        return self._evals[run.name]

    def bootstrap_rows(self, rows: list[Row], gt, reference: int | None) -> tuple[dict, dict[str, int]]:
        """Both intervals for every pair of ``rows`` with per-image evaluations; group key -> row index.

        Pairs with the ``reference`` row come first, as row - reference (the main
        differences; flagged ``main`` and the reference's key stored as
        ``reference``), then the other pairs in row order.
        """
        groups, index_of = {}, {}
        for index, row in enumerate(rows):
            evals = [e for e in (self._per_image(r, gt) for r in row.present) if e is not None]
            if evals:
                key = row.name if row.name not in groups else f"{row.name} ({index})"
                groups[key], index_of[key] = evals, index
        ref = next((k for k, i in index_of.items() if i == reference), None)
        main = [(k, ref) for k in groups if ref is not None and k != ref]
        pairs = main + [p for p in itertools.combinations(groups, 2) if ref not in p]
        c = self.config
        result = bootstrap.paired_bootstrap(groups, c["bootstrap_resamples"], c["bootstrap_seed"],
                                            c["bootstrap_confidence"], pairs=pairs)
        for item in result["intervals"]:
            item["main"] = item["b"] == ref
        return {**result, "reference": ref}, index_of

    def group(self, group: tuple[str, str, str], row_sets: dict[str, list[Row]]) -> None:
        profile, dataset, split = group
        extra = self.config["paper_settings"].get(profile) or {}
        if set(extra) - {"backbone", "schedule"} or (extra and len(extra) != 2):
            raise InputError("params.yaml", "report.paper_settings.<profile> needs exactly backbone and schedule",
                             record=profile)
        setting = Setting(profile, dataset, split, extra.get("backbone"), extra.get("schedule"))
        slug = re.sub(r"[^a-z0-9]+", "-", f"{profile}-{dataset}-{split}".lower()).strip("-")
        data_dir = self.project / self.config["data_dirs"].get(dataset, f"data/{dataset}")
        gt_path = data_dir / f"{split}.json"
        section = {"title": f"Results: {setting.describe()}", "tables": [], "figures": [],
                   "intro": "Reproduced with simbench; every method shares the detector, schedule and data."}
        grouped = {name: rows_for_group(rows, group) for name, rows in row_sets.items()}
        for name in list(grouped):
            if sum(bool(row.runs) for row in grouped[name]) < (1 if name == "main" else 2):
                if name != "main" and any(row.runs for row in grouped[name]):
                    self.notes.append(f"{name} table skipped for {setting.describe()}: fewer than two "
                                      "of its rows have configured runs.")
                del grouped[name]
        boot, gt = {}, None
        if gt_path.exists():
            gt = make_gt_api(load_gt(gt_path).to_dict(), "pycocotools")  # checked by the one gate first
            for name, rows in grouped.items():
                reference = 0 if name != "main" else next(
                    (i for i, row in enumerate(rows) if row.method == self.config["bootstrap_reference"]), None)
                boot[name] = self.bootstrap_rows(rows, gt, reference)
        else:
            self.notes.append(f"{latex.latex_escape(gt_path)} not found: no bootstrap or qualitative figure "
                              f"for {setting.describe()}.")
        significance = {name: tables.Significance.from_bootstrap(*result) for name, result in boot.items()}
        main = grouped.get("main", [])
        if main:
            marks, mark_text = self._marks(main, boot.get("main"), split)
            section["tables"].append(self.table(f"main_{slug}", tables.comparison_table(
                main, setting, self.paper, marks=marks, mark_text=mark_text, label=f"tab:main-{slug}",
                significance=significance.get("main"))))
            if any(r.metrics.get("voc") for row in main for r in row.present):
                section["tables"].append(self.table(f"voc_{slug}", tables.comparison_table(
                    main, setting, self.paper, section="voc", label=f"tab:voc-{slug}", title="VOC-style comparison")))
            bars = [(row.name, row.method, {c: (s.mean, s.std) if (s := row.stat("segm", c)) else None
                                            for c in ("APs", "APm", "APl")}) for row in main if row.present]
            if bars:
                section["figures"].append(self.figure(plots.plot_ap_by_size(
                    bars, self.root / "figures" / f"ap_by_size_{slug}", setting.describe(tex=False)),
                    f"Mask AP by object size, {setting.describe()} (error bars: std over seeds).", 0.75))
        panels = []
        for name, (title, first) in ABLATION_TITLES.items():
            if name in grouped:
                section["tables"].append(self.table(f"{name}_{slug}", tables.ablation_table(
                    grouped[name], setting, self.paper, title=title, first_header=first, label=f"tab:{name}-{slug}",
                    significance=significance.get(name))))
                panels.append(_panel(title, grouped[name], self.paper))
        if panels:
            section["figures"].append(self.figure(plots.plot_ablation_deltas(
                panels, self.root / "figures" / f"ablations_{slug}"),
                "Ablations: AP difference to the first row of each table, reproduced beside reported.", 1.0))
        intervals = []
        for name, (result, index_of) in boot.items():
            self.boot_json.append({"setting": dataclasses.asdict(setting), "table": name, **result})
            rows = grouped[name]
            for item in result["intervals"]:
                intervals.append({**item, "table": name, "a_tex": rows[index_of[item["a"]]].label_tex,
                                  "b_tex": rows[index_of[item["b"]]].label_tex,
                                  "n_a": result["n_seeds"][item["a"]], "n_b": result["n_seeds"][item["b"]]})
        if intervals:
            first = next(result for result, _ in boot.values() if result["intervals"])
            section["tables"].append(self.table(f"bootstrap_{slug}", tables.bootstrap_table(
                intervals, first["resamples"], first["n_images"], first["confidence"], label=f"tab:boot-{slug}")))
        if gt is not None and main and not (data_dir / "images").is_dir():
            self.notes.append(f"{latex.latex_escape(data_dir / 'images')} not found: no qualitative figure.")
        elif gt is not None and main and (fig := self._qualitative(gt, data_dir, main, slug)):
            section["figures"].append(fig)
        self.sections.append(section)

    def _marks(self, rows: list[Row], boot: tuple[dict, dict] | None, split: str) -> tuple[list[bool] | None, str]:
        """Main-table marks: the two-level interval of AP(row) - AP(reference) excludes 0."""
        if boot is None or boot[0].get("reference") is None:
            return None, ""
        result, index_of = boot
        significance = tables.Significance.from_bootstrap(result, index_of)
        ref = index_of[result["reference"]]
        marks = [i != ref and significance.differs(i, ref) for i in range(len(rows))]
        text = (rf" $^{{\ast}}$: the {result['confidence'] * 100:.0f}\% two-level bootstrap interval (seeds and "
                rf"validation images) of AP(row) $-$ AP({rows[ref].label_tex}) excludes 0 ({result['resamples']} "
                rf"resamples of {result['n_images']} {latex.latex_escape(split)} images; the bootstrap table "
                "gives it beside the images-only interval).")
        return marks, text

    def _qualitative(self, gt, data_dir: Path, rows: list[Row], slug: str) -> dict | None:
        c = self.config
        columns = []
        for method in c["qualitative_methods"]:
            row = next((r for r in rows if r.method == method), None)
            runs = [r for r in (row.present if row else []) if (self.runs_dir / r.name / "segm.json").exists()]
            results = _checked_segm(self.runs_dir / runs[0].name / "segm.json", gt) if runs else None
            columns.append((display_name(method), results))
        if all(res is None for _, res in columns):
            return None
        ids = qualitative.choose_images(gt.dataset, c["qualitative_image_ids"], c["qualitative_count"])
        paths = qualitative.qualitative_grid(gt.dataset, data_dir / "images", columns, ids,
                                             self.root / "figures" / f"qualitative_{slug}",
                                             c["qualitative_score_thresh"], c["qualitative_max_dets"])
        return self.figure(paths, f"The same validation images for every method (first seed): GT boxes, then "
                                  f"masks with score $\\geq$ {c['qualitative_score_thresh']}.", 1.0)


def _checked_segm(path: Path, gt) -> list[dict]:
    """A run's segm.json, checked by the one gate against the ground truth, as compressed RLE records."""
    results = read_json(path, "results")
    check_results(results, gt.dataset, path, "segm")
    return normalise_results(results, "segm")


def _panel(title: str, rows: list[Row], paper: tables.PaperNumbers) -> plots.AblationPanel:
    aps = [s.mean if (s := row.stat("segm", "AP")) else None for row in rows]
    reported = [paper.get(r.paper_id).values.get("AP") if r.paper_id else None for r in rows]
    delta = lambda v, b: None if v is None or b is None else v - b  # noqa: E731
    return plots.AblationPanel(re.sub(r"[\\$]|mathcal", "", title), [r.name for r in rows],
                               [delta(v, aps[0]) for v in aps], [delta(v, reported[0]) for v in reported])


def supervision_quality_section(report: _Report, root: Path, curves: dict, smooth: int) -> dict:
    """Figure "supervision quality over training" and the table of final values (runs with ``sq/`` keys)."""
    paths = plots.plot_supervision_quality(curves, root / "figures" / "supervision_quality", smooth)
    caption = ("Supervision quality over training (\\%): each method's own mask targets scored against the "
               "ground-truth masks every logged iteration; one row per family of targets, one panel per metric; "
               f"colour: method, line style: run within a method; moving average over {smooth} points.")
    final = [(run, *plots.final_quality(frame)) for run, (_, frame) in curves.items()]
    table = report.table("supervision_quality", tables.supervision_quality_table(final))
    return {"title": "Supervision quality over training",
            "intro": ("Computed without gradients from the targets each loss actually uses "
                      "(train.supervision\\_diagnostics); never part of the loss."),
            "tables": [table], "figures": [report.figure(paths, caption, 1.0)]}


def upstream_pairs(params: dict, runs_dir: Path) -> list[dict]:
    """Each ``upstream_runs`` entry with metrics, beside the simbench run it is compared with.

    The partner is the entry's ``compare`` run, else the run of ``runs`` with the
    same method, no ``set`` and the same seed (else any seed of it). Returns
    ``[{"title", "method_name", "original": RunResult, "reimplementation": RunResult | None}]``.
    """
    from baselines.upstream import CODES

    declared = params.get("upstream_runs") or {}
    runs = params.get("runs") or {}
    pairs = []
    for name, entry in declared.items():
        metrics = load_metrics(runs_dir / name / "metrics.json", name)
        if metrics is None or not isinstance(entry, dict) or entry.get("code") not in CODES:
            continue
        code = CODES[entry["code"]]
        partner = entry.get("compare")
        if partner is None:
            plain = [n for n, r in runs.items() if isinstance(r, dict) and r.get("method") == code["method"]
                     and not r.get("set")]
            same_seed = [n for n in plain if runs[n].get("seed", 0) == entry.get("seed", 0)]
            partner = (same_seed or plain or [None])[0]
        elif partner not in runs:
            raise InputError("params.yaml", f"upstream_runs.{name}.compare names {partner!r}, not a run in `runs`")
        reimpl = None
        if partner is not None:
            reimpl = RunResult(partner, runs[partner].get("seed"), load_metrics(runs_dir / partner / "metrics.json",
                                                                                partner))
            if reimpl.metrics is None:
                reimpl = None
        pairs.append({"title": code["title"], "fixes": [str(x) for x in entry.get("fixes") or []],
                      "ablations": [str(x) for x in entry.get("ablations") or []],
                      "method_name": display_name(code["method"]),
                      "original": RunResult(name, metrics.get("seed"), metrics), "reimplementation": reimpl,
                      "configuration": _pair_configuration(entry, runs.get(partner) if partner else None)})
    return pairs


def _pair_configuration(entry: dict, partner: dict | None) -> str:
    """What a pair runs apart from its seeds: pairs with equal strings are seeds of one comparison."""
    def without_seed(spec: dict | None) -> dict:
        return {k: v for k, v in (spec or {}).items() if k not in ("seed", "compare")}
    return json.dumps([without_seed(entry), without_seed(partner)], sort_keys=True, default=str)


def pooled_seed_rows(report: "_Report", rows: list[dict], gt, setting: Setting) -> list[dict]:
    """``rows`` with a row after each comparison run with two or more seeds: the seed means and the
    two-level (seeds + images) interval of AP(original) - AP(simbench) (docs/statistics.md).

    A single pair's interval resamples images only: each side is one trained model, so it cannot tell
    a difference between the codes from the spread between training seeds. The pooled row can.
    """
    c = report.config
    by_configuration: dict[str, list[dict]] = {}
    for pair in rows:
        if pair["reimplementation"] is not None:
            by_configuration.setdefault(pair["configuration"], []).append(pair)
    out = []
    for pair in rows:
        out.append(pair)
        seeds = by_configuration.get(pair["configuration"], [])
        if len(seeds) < 2 or pair is not seeds[-1]:
            continue
        pooled = {"title": pair["title"], "method_name": pair["method_name"], "fixes": pair["fixes"],
                  "ablations": pair["ablations"], "pooled": True,
                  "originals": [p["original"] for p in seeds],
                  "reimplementations": [p["reimplementation"] for p in seeds]}
        if gt is not None:
            evals = {"a": [report._per_image(run, gt) for run in pooled["originals"]],
                     "b": [report._per_image(run, gt) for run in pooled["reimplementations"]]}
            if all(all(group) for group in evals.values()):
                result = bootstrap.paired_bootstrap(evals, c["bootstrap_resamples"], c["bootstrap_seed"],
                                                    c["bootstrap_confidence"])
                item = result["intervals"][0]
                pooled["interval"] = {"diff": item["diff"], **item["two_level"]}
                pooled["resamples"] = result["resamples"]
                report.boot_json.append({"setting": dataclasses.asdict(setting), "table": "original_code_seeds",
                                         "a": [r.name for r in pooled["originals"]],
                                         "b": [r.name for r in pooled["reimplementations"]], **result})
        out.append(pooled)
    return out


def original_code_section(report: _Report, pairs: list[dict]) -> dict:
    """Table "reimplementation vs original code" per (profile, dataset, split), with paired-bootstrap intervals."""
    c = report.config
    tables_out = []
    for group in sorted({group_of(p["original"]) for p in pairs}):
        profile, dataset, split = group
        setting = Setting(profile, dataset, split)
        gt_path = report.project / c["data_dirs"].get(dataset, f"data/{dataset}") / f"{split}.json"
        gt = make_gt_api(load_gt(gt_path).to_dict(), "pycocotools") if gt_path.exists() else None
        if gt is None:
            report.notes.append(f"{latex.latex_escape(gt_path)} not found: no bootstrap interval in the "
                                f"reimplementation vs original code table for {setting.describe()}.")
        rows = []
        for pair in (p for p in pairs if group_of(p["original"]) == group):
            pair = dict(pair)
            reimpl = pair["reimplementation"]
            if reimpl is not None and group_of(reimpl) != group:
                pair["reimplementation"] = reimpl = None
            if gt is not None and reimpl is not None:
                evals = {key: report._per_image(run, gt) for key, run in (("a", pair["original"]), ("b", reimpl))}
                if all(evals.values()):
                    result = bootstrap.paired_bootstrap({k: [v] for k, v in evals.items()},
                                                        c["bootstrap_resamples"], c["bootstrap_seed"],
                                                        c["bootstrap_confidence"])
                    item = result["intervals"][0]  # one run each: the two intervals are equal
                    pair["interval"] = {"diff": item["diff"], **item["image"]}
                    pair["resamples"] = result["resamples"]
                    report.boot_json.append({"setting": dataclasses.asdict(setting), "table": "original_code",
                                             "a": pair["original"].name, "b": reimpl.name, **result})
            rows.append(pair)
        rows = pooled_seed_rows(report, rows, gt, setting)
        slug = re.sub(r"[^a-z0-9]+", "-", f"{profile}-{dataset}-{split}".lower()).strip("-")
        tables_out.append(report.table(f"original_code_{slug}", tables.original_code_table(
            rows, setting, label=f"tab:original-code-{slug}")))
    return {"title": "Reimplementation vs original code", "tables": tables_out, "figures": [],
            "intro": ("The authors' own code bases (a user's checkout, never part of simbench) trained on the "
                      "same data and schedule by \texttt{simbench upstream} and scored by the same evaluator.")}


def training_machines(results: dict[str, RunResult]) -> list[str]:
    """The distinct "device, precision" the runs with metrics trained on (``metrics.json``'s ``trained_on``)."""
    seen = {f"{t.get('device') or 'unknown device'}, {t.get('precision') or 'unknown precision'}"
            for r in results.values() if r.metrics and isinstance(t := r.metrics.get("trained_on"), dict)}
    return sorted(seen)


def machines_note(machines: list[str]) -> str:
    """One sentence for the report's stamp: where the runs trained, and a warning when that differs.

    The CPU and the precision change a run's numbers as a new seed does
    (``docs/statistics.md``), so differences between rows of different machines
    contain that too."""
    if not machines:
        return "Training machine: not recorded."
    if len(machines) == 1:
        return f"Trained on {machines[0]}."
    return (f"Runs trained on {len(machines)} different machines or precisions ({'; '.join(machines)}): "
            "differences between them include the machine's rounding, not only the methods.")


def _short(commit: str) -> str:
    """``<12 hex>`` or ``<12 hex>+dirty``."""
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def training_commits(runs_dir: Path, names: list[str]) -> dict[str, list[str]]:
    """``{commit: [runs]}``: the code each run's training segments ran (their ``run.json``)."""
    from sim_core.engine.records import segment_commits

    out: dict[str, list[str]] = {}
    for name in names:
        try:
            stamp = json.loads((runs_dir / name / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for commit in segment_commits(stamp if isinstance(stamp, dict) else None):
            out.setdefault(commit, []).append(name)
    return out


def commits_note(trained: dict[str, list[str]]) -> str:
    """One sentence for the stamp: the code the runs trained with, and a warning when that differs."""
    if not trained:
        return "Training code: not recorded."
    if len(trained) == 1:
        return f"Trained at commit {_short(next(iter(trained)))}."
    parts = "; ".join(f"{_short(c)}: {', '.join(sorted(set(runs)))}" for c, runs in sorted(trained.items()))
    return (f"WARNING: the runs trained under {len(trained)} different code versions ({parts}); a difference "
            "between rows may come from the code, not only the methods.")


def run_report(params: dict, runs_dir: Path, out: Path, stale: dict[str, str] | None = None) -> None:
    """Write tables, figures, bootstrap.json, report.tex and (with pdflatex) report.pdf to ``out``.

    ``stale``: ``{run: why}`` of runs whose records disagree with the params
    (``experiments.report_cli.stale_runs``): left out of every comparison and
    listed in a table of their own."""
    config, specs = report_config(params), run_specs(params)
    runs_dir, out = Path(runs_dir), Path(out)
    stale = stale or {}
    paper = tables.load_paper_numbers()
    recorded = {n: load_metrics(runs_dir / n / "metrics.json", n) for n in specs}
    results = {n: RunResult(n, s.get("seed"), None if n in stale else recorded[n]) for n, s in specs.items()}
    row_sets = {"main": build_rows(specs, results, config.get("main") or default_main_rows(specs))}
    for name, default in DEFAULT_ABLATIONS.items():
        row_sets[name] = build_rows(specs, results, config.get(name, default))
    groups = sorted({group_of(r) for r in results.values() if r.metrics}) or [("unknown", "unknown", "val")]
    failure = None
    with atomic_directory(out) as root:
        (root / "tables").mkdir(), (root / "figures").mkdir()
        report = _Report(root, config, paper, runs_dir)
        report.notes += [f"run {latex.latex_escape(n)}: no metrics.json (shown as ---)."
                         for n, r in results.items() if r.metrics is None and n not in stale]
        if stale:
            rows = [(n, ((recorded[n] or {}).get("segm") or {}).get("AP"), why) for n, why in stale.items()]
            report.sections.append({"title": "Stale runs (not compared)", "figures": [], "intro": "",
                                    "tables": [report.table("stale", tables.stale_table(rows))]})
        for group in groups:
            report.group(group, row_sets)
        pairs = upstream_pairs(params, runs_dir)
        if pairs:
            report.sections.append(original_code_section(report, pairs))
        curves = {n: (s["method"], f) for n, s in specs.items() if (f := plots.load_curves(runs_dir / n)) is not None}
        if curves:
            paths = plots.plot_training_curves(curves, root / "figures" / "training_curves",
                                               int(config["curve_smoothing"]))
            caption = ("Total loss and mask-loss terms vs.\\ iteration; colour: method, line style: run within "
                       f"a method; moving average over {int(config['curve_smoothing'])} points.")
            report.sections.append({"title": "Training curves", "intro": "", "tables": [],
                                    "figures": [report.figure(paths, caption, 1.0)]})
        quality = {n: c for n, c in curves.items() if plots.quality_columns(c[1])}
        if quality:
            report.sections.append(supervision_quality_section(report, root, quality, int(config["curve_smoothing"])))
        published = [report.table(f"paper_sim_t{t}", tables.paper_table(paper, "sim", t, f"tab:paper-sim-t{t}"))
                     for t in ("1", "2", "3", "4", "5")]
        report.sections.append({"title": "Published numbers", "tables": published, "figures": [],
                                "intro": "As recorded in reports/paper\\_numbers.yaml, with their sources."})
        commits = sorted({str(r.metrics.get("git_commit")) for r in results.values()
                          if r.metrics and r.metrics.get("git_commit")})
        trained = training_commits(runs_dir, [n for n, r in results.items() if r.metrics is not None])
        machines = training_machines(results)
        stamp = (f"{sum(r.metrics is not None for r in results.values())} of {len(results)} configured runs "
                 f"have metrics; evaluated at commit(s) "
                 f"{latex.latex_escape(', '.join(_short(c) for c in commits) or 'unknown')}. "
                 f"{latex.latex_escape(commits_note(trained))} "
                 f"{latex.latex_escape(machines_note(machines))} "
                 f"Bootstrap: {config['bootstrap_resamples']} resamples, seed {config['bootstrap_seed']}.")
        atomic_write_json(root / "bootstrap.json", {"commits": commits, "training_commits": trained,
                                                    "stale": stale, "trained_on": machines, "report_params": config,
                                                    "interval_kinds": INTERVAL_KINDS, "tables": report.boot_json})
        atomic_write_text(root / "report.tex", latex.render_report({
            "title": "simbench: box-supervised instance segmentation, reproduced", "stamp": stamp,
            "sections": report.sections, "notes": report.notes}))
        try:
            latex.compile_pdf(root / "report.tex")  # warns and returns None without pdflatex
        except latex.LatexError as exc:
            atomic_write_text(root / "report.log", str(exc) + "\n")
            failure = exc
    if failure is not None:  # after the directory is in place, so report.tex and report.log can be read
        raise failure
