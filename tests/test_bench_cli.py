"""`simbench bench` runs and writes numbers (no speed is asserted)."""
from __future__ import annotations

import json
from pathlib import Path

from sim_core.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_bench_writes_each_requested_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--only", "methods,lab", "--iters", "1", "--batch", "2", "--size", "64",
                 "--params", str(REPO / "experiments" / "profiles" / "smoke.yaml"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    methods = data["methods"]
    for name in ("mask", "boxmask", "boxinst", "boxlevelset", "boxlevelset_no_tree", "sim", "sim_released_code"):
        assert isinstance(methods[name], float) and methods[name] > 0, (name, methods[name])
    assert methods["relative_to_mask"]["mask"] == 1.0
    assert data["lab"]["kornia_batch_s"] > 0


def test_bench_rejects_unknown_section(tmp_path, capsys):
    assert main(["bench", "--only", "warp", "--out", str(tmp_path / "b.json")]) == 2
    assert "unknown section 'warp'" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
