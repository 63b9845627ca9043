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
    precision_rows = [f"{m}_{p}" for m in ("mask", "boxinst", "boxlevelset", "sim") for p in ("fp32", "bf16", "bf16_gn_bf16")]
    for name in ("mask", "boxmask", "boxinst", "boxlevelset", "boxlevelset_no_tree", "sim", "sim_released_code",
                 *precision_rows):
        assert isinstance(methods[name], float) and methods[name] > 0, (name, methods[name])
    assert methods["relative_to_mask"]["mask"] == 1.0
    assert isinstance(data["machine"]["native_cpu_bfloat16"], bool)  # read beside the mask_bf16 row
    assert data["lab"]["kornia_batch_s"] > 0


def test_bench_rejects_unknown_section(tmp_path, capsys):
    assert main(["bench", "--only", "warp", "--out", str(tmp_path / "b.json")]) == 2
    assert "unknown section 'warp'" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_bench_profile_parts_add_up_to_the_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--only", "profile", "--iters", "1", "--batch", "2", "--size", "64", "--val-images", "2",
                 "--params", str(REPO / "experiments" / "profiles" / "smoke.yaml"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    prof = json.loads(out.read_text())["profile"]
    assert prof["threads"] == 1 and prof["batch"] == 2
    for method in ("mask", "boxmask", "boxinst", "boxlevelset", "sim"):
        entry = prof["methods"][method]
        assert isinstance(entry, dict), (method, entry)
        parts = entry["parts_ms"]
        for name in ("backbone", "fpn", "fcos_head", "mask_branch", "dynamic_mask_head", "fcos_assignment",
                     "mask_instance_sampling", "optimizer_step", "backward:backbone", "other"):
            assert name in parts, (method, name, sorted(parts))
        assert all(v >= 0 for v in parts.values()), (method, parts)
        assert abs(sum(parts.values()) - entry["step_ms"]) <= 0.001 * len(parts) + 1e-6, (method, entry["step_ms"])
        assert abs(sum(entry["parts_share"].values()) - 1) < 0.01
        assert entry["step_ms_unprofiled"] > 0 and entry["gflop_per_step"] > 0
        assert 0 < len(entry["top_ops_self_cpu"]) <= 15
    terms = {"boxinst": ("loss_projection", "loss_pairwise"),
             "boxlevelset": ("levelset_image_term", "levelset_feature_term", "levelset_length", "levelset_tree_filter"),
             "sim": ("sim_teacher_pass", "sim_pseudo_loss", "ema_teacher_update", "sim_prototype_update")}
    for method, names in terms.items():
        assert set(names) <= set(prof["methods"][method]["parts_ms"]), (method, names)
    assert prof["data_loading"]["cached"]["getitem_ms_per_batch"] > 0
    ev = prof["evaluation"]
    assert ev["val_images"] == 2
    for name in ("model_load", "backbone", "coco_evaluation", "other"):
        assert name in ev["parts_ms"], sorted(ev["parts_ms"])
    assert all(v >= 0 for v in ev["parts_ms"].values())
    assert abs(sum(ev["parts_ms"].values()) - ev["total_ms"]) <= 0.001 * len(ev["parts_ms"]) + 1e-6
