"""Report tables from fixture metrics: means, stds, significance-gated bold, deltas, missing and external runs."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from strict_skips import PDFINFO_MISSING, PDFLATEX_MISSING

from experiments.report import (DEFAULT_ABLATIONS, build_rows, default_main_rows, load_metrics, report_config,
                                run_report, run_specs)
from reports import latex, tables
from reports.tables import RunResult, Setting, Significance
from sim_core.errors import InputError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "report"
DEMO = Setting("demo", "synthetic", "val")
COCO_R50 = Setting("coco_r50_1x", "coco", "val", "R-50-FPN", "1x")


def _rows(params: dict, row_specs: list[dict] | None = None, runs_dir: Path = FIXTURES / "runs"):
    specs = run_specs(params)
    results = {n: RunResult(n, s.get("seed"), load_metrics(runs_dir / n / "metrics.json", n))
               for n, s in specs.items()}
    return build_rows(specs, results, row_specs if row_specs is not None else default_main_rows(specs))


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((FIXTURES / "params.yaml").read_text())


@pytest.fixture(scope="module")
def paper() -> tables.PaperNumbers:
    return tables.load_paper_numbers()


def _significance(**pairs: tuple[float, float]) -> Significance:
    """Two-level intervals (AP fractions) of AP(row i) - AP(row j), given as ``p{i}_{j}=(low, high)``."""
    table = {}
    for key, (low, high) in pairs.items():
        i, j = (int(v) for v in key[1:].split("_"))
        table[(i, j)], table[(j, i)] = (low, high), (-high, -low)
    return Significance(table, 0.95, 200, 300)


def _line(text: str, start: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(start)]
    return [cell.strip() for cell in line.rstrip("\\ ").split("&")]


def test_main_table_statistics_bold_missing_and_external(params, paper) -> None:
    text = tables.comparison_table(_rows(params), DEMO, paper)
    boxinst = _line(text, "BoxInst")
    assert boxinst[1] == r"31.0$\pm$1.0"          # 30, 31, 32 -> mean 31.0, sample std 1.0
    assert boxinst[-1] == "3"
    sim = _line(text, "SIM")
    assert sim[1] == r"33.5$\pm$0.7"               # 33, 34 -> 33.5 +- 0.71; no intervals given: no bold
    assert sim[-1] == "2/3"                        # sim_s2 configured, no metrics
    assert "textbf" not in text and "No interval is available for this table, so nothing is bold" in text
    upper = _line(text, "Mask (upper bound)")
    assert upper[1] == "40.0" and "textbf" not in " ".join(upper)  # the upper bound never competes
    assert _line(text, "Box as mask")[1:7] == ["---"] * 6
    external = _line(text, r"BoxLevelSet$^{\dagger}$")
    assert external[4] == "---"                    # APs = -1 (no small objects) prints as missing
    assert r"$^{\dagger}$ imported" in text
    assert "mean$\\pm$std over 1--3 seeds" in text and "profile demo" in text
    assert "reported" not in text and "30.7" not in text  # small-scale runs never meet paper numbers
    assert text.count(r"\toprule") == 1 and text.count(r"\bottomrule") == 1


def test_paper_setting_shows_reported_values_and_deltas(paper) -> None:
    params = {"runs": {"boxinst_r50_s0": {"method": "boxinst", "seed": 0}}}
    text = tables.comparison_table(_rows(params), COCO_R50, paper)
    assert _line(text, "BoxInst")[:4] == ["BoxInst", "R-50-FPN", "1x", "30.1"]  # nothing to beat: no bold
    assert _line(text, r"\quad\textit{reported} (SIM T3)")[3:9] == ["30.7", "52.2", "31.1", "13.8", "33.1", "45.7"]
    assert _line(text, r"\quad\textit{reported} (AdelaiDet)")[3:5] == ["30.7", "---"]
    delta = _line(text, r"\quad $\Delta$")
    assert delta[3:9] == ["$-0.6$", "$-0.2$", "$+0.4$", "$+0.2$", "$-0.1$", "$+0.2$"]


def test_voc_table_at_the_papers_setting(paper) -> None:
    metrics = {"segm": {"AP": 0.35}, "voc": {"AP": 0.35, "AP25": 0.75, "AP50": 0.63, "AP70": 0.44, "AP75": 0.36}}
    rows = [tables.Row("BoxLevelSet", "boxlevelset", [RunResult("bls_s0", 0, metrics)])]
    voc_r50 = Setting("voc_r50", "voc", "val", "R-50-FPN", "voc")
    text = tables.comparison_table(rows, voc_r50, paper, section="voc")
    assert "AP$_{25}$" in text and "AP$_S$" not in text
    assert _line(text, r"\quad\textit{reported} (SIM T2)")[3:8] == ["36.3", "---", "64.2", "---", "35.9"]
    assert _line(text, r"\quad\textit{reported} (BoxLevelSet)")[3:8] == ["36.3", "76.3", "64.2", "43.9", "35.9"]
    assert _line(text, r"\quad $\Delta$")[3:8] == ["$-1.3$", "$-1.3$", "$-1.2$", "$+0.1$", "$+0.1$"]


def test_best_ap_is_bold_only_when_its_two_level_interval_excludes_zero(params, paper) -> None:
    """Main rows: 0 Mask, 1 Box as mask (no metrics), 2 BoxInst 31.0, 3 BoxLevelSet 30.5, 4 SIM 33.5."""
    rows = _rows(params)
    assert [r.name for r in rows] == ["Mask (upper bound)", "Box as mask", "BoxInst", "BoxLevelSet", "SIM"]
    above_both = _significance(p4_2=(0.01, 0.04), p4_3=(0.002, 0.05), p3_2=(-0.03, 0.02))
    text = tables.comparison_table(rows, DEMO, paper, significance=above_both)
    assert _line(text, "SIM")[1] == r"\textbf{33.5}$\pm$0.7"
    assert text.count("textbf") == 1  # the AP column only; the other columns are never bold
    assert "excludes 0; other columns are not tested and never bold" in text
    assert "every other row but the mask-supervised upper bound" in text
    # The runner-up BoxInst is significantly below, BoxLevelSet is not: no bold at all.
    against_third = _significance(p4_2=(0.01, 0.04), p4_3=(-0.001, 0.05), p3_2=(-0.03, 0.02))
    text = tables.comparison_table(rows, DEMO, paper, significance=against_third)
    assert _line(text, "SIM")[1] == r"33.5$\pm$0.7" and "textbf" not in text.split(r"\caption")[0]
    # A missing interval (a row without segm.json) cannot support the claim either.
    missing = _significance(p4_2=(0.01, 0.04))
    assert tables.bold_row(rows, missing) is None
    assert tables.bold_row(rows, above_both) == 4
    assert tables.bold_row(rows, _significance(p4_2=(-0.01, 0.04), p4_3=(0.002, 0.05))) is None
    # The mask-supervised upper bound is higher but does not compete, and the VOC-style table is never bold.
    voc = tables.comparison_table(rows, DEMO, paper, section="voc", significance=above_both)
    assert "textbf" not in voc and "No bold: the bootstrap tests mask AP only." in voc


def test_ablation_delta_is_bold_only_when_its_interval_excludes_zero(params, paper) -> None:
    """Components: 0 BoxInst 31.0, 1 + L_pseudo 32.0 (+1.0), 2 + L_pseudo + L_paste 33.5 (+2.5)."""
    rows = _rows(params, DEFAULT_ABLATIONS["components"])
    sig = _significance(p1_0=(0.002, 0.02), p2_0=(-0.005, 0.05), p2_1=(0.001, 0.03))
    text = tables.ablation_table(rows, DEMO, paper, title="Components", first_header="Setting", label="tab:c",
                                 significance=sig)
    pseudo = _line(text, r"+ $\mathcal{L}_{pseudo}$ &")
    assert pseudo[1] == "32.0" and pseudo[-3] == r"{\boldmath\textbf{$+1.0$}}"
    full = _line(text, r"+ $\mathcal{L}_{pseudo}$ + $\mathcal{L}_{paste}$")
    assert full[-3] == "$+2.5$"  # its interval against the first row includes 0
    assert full[1] == r"33.5$\pm$0.7"  # highest AP, but not significantly above BoxInst: not bold
    assert _line(text, "BoxInst")[-3] == "$+0.0$"
    assert "bold only where its two-level bootstrap interval (seeds and validation images) excludes 0" in text
    sig = _significance(p1_0=(0.002, 0.02), p2_0=(0.001, 0.05), p2_1=(0.001, 0.03))
    text = tables.ablation_table(rows, DEMO, paper, title="Components", first_header="Setting", label="tab:c",
                                 significance=sig)
    full = _line(text, r"+ $\mathcal{L}_{pseudo}$ + $\mathcal{L}_{paste}$")
    assert full[1] == r"\textbf{33.5}$\pm$0.7" and full[-3] == r"{\boldmath\textbf{$+2.5$}}"


def test_component_ablation_deltas_beside_the_papers(params, paper) -> None:
    rows = _rows(params, DEFAULT_ABLATIONS["components"])
    text = tables.ablation_table(rows, DEMO, paper, title="Components", first_header="Setting", label="tab:c")
    assert "Reported AP &" not in text  # other setting: only the paper's differences
    assert _line(text, "BoxInst")[-3:] == ["$+0.0$", "$+0.0$", "3"]
    pseudo = _line(text, r"+ $\mathcal{L}_{pseudo}$ &")
    assert pseudo[1] == "32.0" and pseudo[-3:] == ["$+1.0$", "$+1.2$", "1"]
    full = _line(text, r"+ $\mathcal{L}_{pseudo}$ + $\mathcal{L}_{paste}$")
    assert full[-3:] == ["$+2.5$", "$+1.5$", "2/3"]
    at_paper = tables.ablation_table(rows, COCO_R50, paper, title="C", first_header="S", label="tab:c")
    assert "Reported AP" in at_paper and _line(at_paper, "BoxInst")[-3] == "30.7"


def test_sweep_rows_match_overrides_exactly(params) -> None:
    rows = _rows(params, DEFAULT_ABLATIONS["alpha"])
    assert [[r.name for r in row.runs] for row in rows] == [
        ["sim_alpha0_s0"], [], ["sim_s0", "sim_s1", "sim_s2"], [], []]  # 0.5 is the plain sim run


def test_run_names_are_escaped_and_bootstrap_table(params, paper) -> None:
    row_specs = [{"label": "run_a&b 100% #1", "runs": ["boxinst_s0"]}, {"label": "x", "runs": ["sim_s0"]}]
    rows = _rows(params, row_specs)
    text = tables.comparison_table(rows, DEMO, paper)
    assert r"run\_a\&b 100\% \#1" in text
    def item(table, a, b, diff, image, two, n=(2, 2)):
        return {"table": table, "a_tex": a, "b_tex": b, "diff": diff, "n_a": n[0], "n_b": n[1],
                "image": {"low": image[0], "high": image[1]}, "two_level": {"low": two[0], "high": two[1]}}
    intervals = [item("main_x", "y", "x", -0.03, (-0.05, -0.01), (-0.06, -0.002)),
                 item("main_x", "a", "x", -0.02, (-0.03, -0.01), (-0.05, 0.01)),
                 item("t", "a", "b", 0.0, (-0.01, 0.02), (-0.01, 0.02), (1, 1))]
    boot = tables.bootstrap_table(intervals, 1000, 50, 0.95)
    first = _line(boot, r"main\_x & y")
    assert first[3:] == ["2/2", r"{\boldmath\textbf{$-3.0$}}", "[$-5.0$, $-1.0$]",
                         r"{\boldmath\textbf{[$-6.0$, $-0.2$]}}"]
    # Significant on the images alone, not once seeds are resampled: nothing bold.
    assert _line(boot, "main\\_x & a")[3:] == ["2/2", "$-2.0$", "[$-3.0$, $-1.0$]", "[$-5.0$, $+1.0$]"]
    assert _line(boot, "t & a")[3:] == ["1/1", "$+0.0$", "[$-1.0$, $+2.0$]", "[$-1.0$, $+2.0$]"]
    assert "Seeds + images" in boot and "independently per row" in boot
    assert boot.count(r"\midrule") == 2  # the header rule and one between the two tables


def test_bad_params_and_metrics(tmp_path, params) -> None:
    with pytest.raises(InputError, match="runs"):
        run_specs({"runs": {}})
    with pytest.raises(InputError, match="unknown report keys"):
        report_config({"report": {"bootstrap_resample": 10}})
    with pytest.raises(InputError, match="label"):
        report_config({"report": {"main": [{"match": {"method": "sim"}}]}})
    with pytest.raises(InputError, match="not in `runs`"):
        _rows(params, [{"label": "x", "runs": ["nope"]}])
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"segm": {"AP": 31.2}}))  # a percentage where a fraction belongs
    with pytest.raises(InputError, match="fraction"):
        load_metrics(bad, "r")
    bad.write_text("{")
    with pytest.raises(InputError, match="json"):
        load_metrics(bad, "r")
    assert load_metrics(tmp_path / "absent.json", "r") is None


def _all_tables(params, paper) -> list[str]:
    rows = _rows(params)
    out = [tables.comparison_table(rows, DEMO, paper), tables.comparison_table(rows, DEMO, paper, section="voc"),
           tables.comparison_table(_rows({"runs": {"boxinst_r50_s0": {"method": "boxinst"}}}), COCO_R50, paper)]
    for name in ("components", "alpha", "prototypes"):
        out.append(tables.ablation_table(_rows(params, DEFAULT_ABLATIONS[name]), DEMO, paper,
                                         title=name, first_header="$x$", label=f"tab:{name}"))
    out += [tables.paper_table(paper, "sim", t, f"tab:p{t}") for t in "12345"]
    return out


@pytest.mark.skipif(latex.pdflatex_path() is None, reason=PDFLATEX_MISSING)
def test_every_table_compiles_standalone(tmp_path, params, paper) -> None:
    body = "\n\\clearpage\n".join(_all_tables(params, paper))
    tex = tmp_path / "tables.tex"
    tex.write_text(latex.standalone_document(body))
    pdf = latex.compile_pdf(tex, timeout=60, passes=1)
    assert pdf is not None and pdf.read_bytes().startswith(b"%PDF") and not list(tmp_path.glob("latex-*"))


@pytest.mark.skipif(latex.pdflatex_path() is None, reason=PDFLATEX_MISSING)
def test_latex_error_is_reported_and_leaves_no_pdf(tmp_path) -> None:
    tex = tmp_path / "broken.tex"
    tex.write_text(latex.standalone_document(r"\undefinedmacro"))
    with pytest.raises(latex.LatexError, match="Undefined control sequence"):
        latex.compile_pdf(tex, timeout=60, passes=1)
    assert not (tmp_path / "broken.pdf").exists()


def test_missing_pdflatex_writes_tex_and_warns(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(latex, "pdflatex_path", lambda: None)
    tex = tmp_path / "r.tex"
    tex.write_text(latex.standalone_document("x"))
    with pytest.warns(RuntimeWarning, match="skipped r.pdf"):
        assert latex.compile_pdf(tex) is None


def test_run_report_end_to_end(tmp_path) -> None:
    sys.path.insert(0, str(FIXTURES))
    from make_project import build_project
    params = build_project(tmp_path)
    out = tmp_path / "reports" / "out"
    run_report(params, tmp_path / "runs", out)
    main = (out / "tables" / "main_demo-synthetic-val.tex").read_text()
    assert re.search(r"^BoxInst & 9\.7\$\\pm\$0\.0\$\^\{\\ast\}\$", main, re.M)  # worse than SIM, significantly
    boot = json.loads((out / "bootstrap.json").read_text())
    main_boot = next(t for t in boot["tables"] if t["table"] == "main")
    assert main_boot["resamples"] == 200 and main_boot["n_images"] == 10
    assert main_boot["reference"] == "SIM" and main_boot["n_seeds"]["BoxInst"] == 2
    assert [(i["a"], i["b"], i["main"]) for i in main_boot["intervals"]][:4] == [
        ("Mask (upper bound)", "SIM", True), ("Box as mask", "SIM", True), ("BoxInst", "SIM", True),
        ("BoxLevelSet", "SIM", True)]  # the main differences first, as row - reference
    assert not any(i["main"] for i in main_boot["intervals"][4:]) and len(main_boot["intervals"]) == 10
    pair = next(i for i in main_boot["intervals"] if (i["a"], i["b"]) == ("BoxInst", "SIM"))
    assert pair["image"]["high"] < 0 and pair["image"]["excludes_zero"] and pair["two_level"]["excludes_zero"]
    assert set(boot["interval_kinds"]) == {"image", "two_level"}
    components = next(t for t in boot["tables"] if t["table"] == "components")
    assert all(i["b"] == "BoxInst" and i["main"] for i in components["intervals"][:2])
    assert main_boot["ap"]["SIM"] == pytest.approx(json.loads(
        (tmp_path / "runs" / "sim_s0" / "metrics.json").read_text())["segm"]["AP"] / 2 + json.loads(
        (tmp_path / "runs" / "sim_s1" / "metrics.json").read_text())["segm"]["AP"] / 2, abs=1e-6)
    report_tex = (out / "report.tex").read_text()
    for name in ("main_demo-synthetic-val", "components_demo-synthetic-val", "bootstrap_demo-synthetic-val"):
        assert rf"\input{{tables/{name}.tex}}" in report_tex
    for fig in ("training_curves", "qualitative_demo-synthetic-val", "ap_by_size_demo-synthetic-val",
                "supervision_quality"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    assert r"\input{tables/supervision_quality.tex}" in report_tex
    assert "supervision_quality.pdf" in report_tex and "Supervision quality over training" in report_tex
    quality = (out / "tables" / "supervision_quality.tex").read_text()
    # mean of the last 10 logged values: the fixture logs 0.9 - 0.1 exp(-it / 15) at it = 0, 4, ..., 36
    expected = 100 * np.mean([0.9 - 0.1 * np.exp(-it / 15) for it in range(0, 40, 4)])
    assert re.search(rf"^boxinst\\_s0 & 36 & BoxInst pairs & {expected:.1f} & 50\.0 &", quality, re.M)
    assert "level set, image" in quality and "mask\\_s0" not in quality  # mask runs log no diagnostics
    assert "sim\\_missing\\_s2: no metrics.json" in report_tex
    if latex.pdflatex_path() is None:  # everything above checked; the PDF needs TeX (a failure under CI)
        pytest.skip(f"{PDFLATEX_MISSING}: report.pdf not built")
    assert (out / "report.pdf").read_bytes().startswith(b"%PDF")
    if shutil.which("pdfinfo") is None:
        pytest.skip(f"{PDFINFO_MISSING}: report.pdf's page count not checked")
    pages = subprocess.run(["pdfinfo", str(out / "report.pdf")], capture_output=True, text=True, check=True).stdout
    assert int(re.search(r"Pages:\s+(\d+)", pages).group(1)) >= 2


def test_stamp_names_the_training_machines_and_warns_when_they_differ() -> None:
    from experiments.report import machines_note, training_machines

    cpu = {"device": "cpu:Xeon avx512f amx_bf16 threads=1", "precision": "bfloat16 autocast"}
    other = {"device": "cpu:EPYC avx2 threads=1", "precision": "float32"}
    same = {f"r{i}": RunResult(f"r{i}", i, {"trained_on": cpu}) for i in range(2)}
    assert training_machines(same) == ["cpu:Xeon avx512f amx_bf16 threads=1, bfloat16 autocast"]
    assert machines_note(training_machines(same)).startswith("Trained on cpu:Xeon")
    mixed = {**same, "old": RunResult("old", 0, {"segm": {}}), "gone": RunResult("gone", 0, None),
             "epyc": RunResult("epyc", 0, {"trained_on": other})}
    note = machines_note(training_machines(mixed))
    assert note.startswith("Runs trained on 2 different machines or precisions") and "EPYC" in note
    assert machines_note(training_machines({"old": RunResult("old", 0, {"segm": {}})})) == \
        "Training machine: not recorded."
