"""reports/paper_numbers.yaml holds the papers' tables, with sources (checked against DESIGN 7.3-7.5)."""
from __future__ import annotations

import pytest
import yaml

from reports.tables import PAPER_NUMBERS_PATH, Setting, load_paper_numbers
from sim_core.errors import InputError

# A sample of DESIGN section 7.5 / 7.3 / 7.4, typed in by hand: (entry id, column, value).
DESIGN_SAMPLE = [
    ("sim_t1_boxinst_r101_3x", "AP", 33.2), ("sim_t1_boxinst_r101_3x", "APl", 45.1),
    ("sim_t1_boxlevelset_r101_3x", "AP75", 34.1), ("sim_t1_sim_r101_3x", "AP", 35.3),
    ("sim_t1_sim_r101_3x", "APs", 18.4), ("sim_t1_sim_r101_1x", "AP50", 56.8),
    ("sim_t1_boxinst_rdcn101_bifpn_3x", "APm", 37.2), ("sim_t1_boxlevelset_rdcn101_bifpn_3x", "APl", 51.3),
    ("sim_t1_sim_rdcn101_bifpn_3x", "AP", 37.4), ("sim_t1_boxinst_swinb_3x", "AP50", 63.2),
    ("sim_t1_sim_swinb_3x", "AP", 40.2), ("sim_t1_condinst_r101_3x", "AP", 39.1),
    ("sim_t2_boxinst_r50", "AP", 34.3), ("sim_t2_boxinst_r101", "AP75", 37.0),
    ("sim_t2_boxlevelset_r50", "AP50", 64.2), ("sim_t2_sim_r50", "AP", 36.7), ("sim_t2_sim_r101", "AP50", 67.1),
    ("sim_t3_boxinst", "AP", 30.7), ("sim_t3_boxinst", "APs", 13.8), ("sim_t3_pseudo", "AP75", 32.6),
    ("sim_t3_pseudo_paste", "AP", 32.2), ("sim_t3_pseudo_paste", "APl", 48.3),
    ("sim_t4_alpha_0", "AP", 30.5), ("sim_t4_alpha_0.3", "AP", 31.3), ("sim_t4_alpha_0.5", "AP", 32.2),
    ("sim_t4_alpha_0.7", "AP", 32.0), ("sim_t4_alpha_1", "AP", 31.4),
    ("sim_t5_prototypes_1", "AP", 31.6), ("sim_t5_prototypes_5", "AP", 32.0),
    ("sim_t5_prototypes_10", "AP", 32.2), ("sim_t5_prototypes_50", "AP", 32.2),
    ("adelaidet_boxinst_r50_1x", "AP", 30.7),
    ("boxlevelset_voc_r50", "AP", 36.3), ("boxlevelset_voc_r50", "AP25", 76.3),
    ("boxlevelset_voc_r50", "AP70", 43.9), ("boxlevelset_voc_r101", "AP", 38.3),
    ("boxlevelset_voc_r101", "AP25", 77.9), ("boxlevelset_voc_r101", "AP75", 38.7),
]


@pytest.fixture(scope="module")
def paper():
    return load_paper_numbers()


@pytest.mark.parametrize("entry_id,column,value", DESIGN_SAMPLE)
def test_values_match_design(paper, entry_id: str, column: str, value: float) -> None:
    assert paper.get(entry_id).values[column] == value


def test_tables_are_complete(paper) -> None:
    sim = [e for e in paper.entries if e.paper == "sim"]
    counts = {t: sum(e.table == t for e in sim) for t in "12345"}
    assert counts == {"1": 10, "2": 6, "3": 3, "4": 5, "5": 4}
    for entry in sim:
        expected = {"segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"), "voc": ("AP", "AP50", "AP75")}[entry.metrics]
        if entry.table in "123":
            assert tuple(entry.values) == expected, entry.id


def test_every_entry_names_its_source(paper) -> None:
    for entry in paper.entries:
        info = paper.papers[entry.paper]
        assert info["arxiv"] and info["title"] and entry.table and entry.row, entry.id
        assert entry.split in ("val", "test-dev") and entry.backbone and entry.schedule, entry.id
        assert all(0 < v < 100 for v in entry.values.values()), entry.id
    assert paper.papers["sim"]["arxiv"] == "2303.08578"


def test_text_table_disagreement_is_noted(paper) -> None:
    swin = paper.get("sim_t1_sim_swinb_3x")
    assert swin.values["AP"] == 40.2 and "39.6" in swin.note


def test_lookup_by_setting(paper) -> None:
    coco_r50 = Setting("p", "coco", "val", "R-50-FPN", "1x")
    found = paper.find("boxinst", coco_r50, "segm")
    assert [e.id for e in found] == ["sim_t3_boxinst", "adelaidet_boxinst_r50_1x"]
    assert [e.id for e in paper.find("sim", coco_r50, "segm")] == ["sim_t3_pseudo_paste"]
    assert paper.find("sim", Setting("demo", "synthetic", "val"), "segm") == []
    assert paper.cite(paper.get("sim_t3_boxinst")) == "SIM T3"


def test_bad_file_is_rejected(tmp_path) -> None:
    data = yaml.safe_load(PAPER_NUMBERS_PATH.read_text())
    data["entries"].append(dict(data["entries"][0]))
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="duplicate"):
        load_paper_numbers(path)
    data["entries"][-1] = {**data["entries"][0], "id": "x", "paper": "nope"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="unknown paper"):
        load_paper_numbers(path)
