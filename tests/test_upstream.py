"""`simbench upstream` against a fake upstream (tests/fixtures/fake_upstream): no detectron2 in CI.

The fake mimics the entry points the verb uses (register_coco_instances,
default_argument_parser, launch, tools/train_net.py main, adet._C) and writes
``inference/coco_instances_results.json`` from the ground truth, so the whole
path runs: environment check, config translation, private copy and patch,
subprocess with streamed log, import, evaluation, report rows.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from baselines import upstream
from sim_core.cli import main as cli_main
from sim_core.errors import InputError

FAKE = Path(__file__).resolve().parent / "fixtures" / "fake_upstream"


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """Two copies of the fake checkout (adelaidet, sim) and the fake detectron2 on PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", str(FAKE / "site"))
    roots = {}
    for code in ("adelaidet", "sim"):
        roots[code] = tmp_path / f"{code}_checkout"
        shutil.copytree(FAKE / "checkout", roots[code])
    return roots


def _params(smoke_params: dict, roots: dict, runs: dict) -> dict:
    params = json.loads(json.dumps(smoke_params))
    params["upstream"]["python"] = sys.executable
    params["upstream"]["adelaidet"]["root"] = str(roots["adelaidet"])
    params["upstream"]["sim"]["root"] = str(roots["sim"])
    params["upstream_runs"] = runs
    return params


def _opts(flat: list[str]) -> dict:
    return dict(zip(flat[0::2], flat[1::2]))


# ------------------------------------------------------------------------------ translation
def test_translate_shared_settings(smoke_params):
    resolved = json.loads(json.dumps(smoke_params))
    resolved["model"]["backbone"] = "resnet18"
    t = resolved["train"]
    opts, differences = upstream.translate(resolved, "adelaidet", num_classes=6)
    o = _opts(opts)
    assert o["SOLVER.MAX_ITER"] == str(t["max_iter"]) and o["SOLVER.IMS_PER_BATCH"] == str(t["batch_size"])
    assert float(o["SOLVER.BASE_LR"]) == t["lr"]
    assert o["SOLVER.STEPS"] == "(" + ", ".join(map(str, t["steps"])) + ",)"
    assert o["SOLVER.WARMUP_ITERS"] == str(t["warmup_iters"])
    assert o["INPUT.MIN_SIZE_TRAIN"] == f"({resolved['data']['train_sizes'][0]},)"
    assert o["INPUT.MIN_SIZE_TEST"] == str(resolved["data"]["test_size"])
    assert o["SEED"] == str(t["seed"]) and o["MODEL.FCOS.NUM_CLASSES"] == "6"
    assert o["MODEL.RESNETS.DEPTH"] == "18" and o["MODEL.RESNETS.RES2_OUT_CHANNELS"] == "64"
    assert o["MODEL.WEIGHTS"] == '""' and o["MODEL.RESNETS.NORM"] == "BN"  # pretrained: none
    assert o["MODEL.FPN.OUT_CHANNELS"] == str(resolved["model"]["fpn_channels"])
    assert o["MODEL.FCOS.TOP_LEVELS"] == str(len(resolved["model"]["fpn_levels"]) - 3)
    expected_warmup = resolved["boxinst"]["pairwise_warmup_iters"]
    if expected_warmup is None:
        expected_warmup = round(resolved["boxinst"]["pairwise_warmup_frac"] * t["max_iter"])
    assert o["MODEL.BOXINST.PAIRWISE.WARMUP_ITERS"] == str(expected_warmup)
    assert o["DATASETS.TRAIN"] == '("simbench_train",)'
    if t["optimizer"] != "sgd":
        assert any("SGD" in d for d in differences)
    # every value is something detectron2's literal_eval-based merge reads back
    import ast
    for key, value in o.items():
        if key not in ("INPUT.MIN_SIZE_TRAIN_SAMPLING", "MODEL.RESNETS.NORM", "MODEL.FCOS.NORM",
                       "MODEL.CONDINST.MASK_BRANCH.NORM"):
            ast.literal_eval(value)


def test_translate_mask_branch(smoke_params):
    """The mask branch's norm always, and at stride 4 AdelaiDet's P2-P5 branch; simbench's C2 input is a
    difference, its P2 input (model.mask_stride4_input: p2) is not."""
    resolved = json.loads(json.dumps(smoke_params))
    resolved["model"].update(backbone="resnet18", mask_feat_stride=4, mask_stride4_input="p2", mask_branch_norm="BN")
    opts, differences = upstream.translate(resolved, "adelaidet", num_classes=6)
    o = _opts(opts)
    assert o["MODEL.CONDINST.MASK_BRANCH.NORM"] == "BN"
    assert o["MODEL.CONDINST.MASK_BRANCH.IN_FEATURES"] == "['p2', 'p3', 'p4', 'p5']"
    assert o["MODEL.FPN.IN_FEATURES"] == o["MODEL.RESNETS.OUT_FEATURES"] == "['res2', 'res3', 'res4', 'res5']"
    assert not any("mask branch" in d for d in differences)
    resolved["model"].update(mask_stride4_input="c2", mask_branch_norm="GN", mask_branch_channels=64)
    opts, differences = upstream.translate(resolved, "adelaidet", num_classes=6)
    o = _opts(opts)
    assert o["MODEL.CONDINST.MASK_BRANCH.NORM"] == "GN"
    # C2 beside P3-P5 (the backbone patch returns res2); the FPN keeps P3-P5 only
    assert o["MODEL.CONDINST.MASK_BRANCH.IN_FEATURES"] == "['res2', 'p3', 'p4', 'p5']"
    assert o["MODEL.FPN.IN_FEATURES"] == "['res3', 'res4', 'res5']"
    assert o["MODEL.RESNETS.OUT_FEATURES"] == "['res2', 'res3', 'res4', 'res5']"
    assert any("upsamples each refined level straight to stride 4" in d for d in differences)
    assert any("GroupNorm groups: simbench 16, upstream 32" in d for d in differences)
    resolved["model"].update(mask_feat_stride=8, mask_branch_norm="none")
    o = _opts(upstream.translate(resolved, "adelaidet", num_classes=6)[0])
    assert "MODEL.CONDINST.MASK_BRANCH.IN_FEATURES" not in o and o["MODEL.CONDINST.MASK_BRANCH.NORM"] == '""'


def test_translate_refuses_backbones_detectron2_does_not_build(smoke_params):
    resolved = json.loads(json.dumps(smoke_params))
    resolved["model"]["backbone"] = "resnet_tiny"
    with pytest.raises(InputError, match="no detectron2 counterpart"):
        upstream.translate(resolved, "adelaidet", num_classes=6)


def test_sim_patch_scales_the_constants_on_a_copy(tmp_path, smoke_params):
    resolved = json.loads(json.dumps(smoke_params))
    resolved["train"]["max_iter"] = 700
    copy = upstream.private_copy(FAKE / "checkout", tmp_path / "copy")
    diff = upstream.apply_patches(copy, upstream.sim_patches(resolved, scatter_standin=True))
    head = (copy / "adet/modeling/condinst/dynamic_mask_head.py").read_text()
    assert "self._iter > 78:" in head and "float(2100)" in head
    assert f"momentum={float(resolved['sim']['proto_momentum'])!r}" in head
    assert "torch_scatter" not in head.split("def scatter_mean")[0]
    assert f"alpha = {float(resolved['sim']['ema_momentum'])!r}" in (copy / "adet/modeling/condinst/condinst.py").read_text()
    assert "-        if self._iter > 10000:" in diff and "+        if self._iter > 78:" in diff
    assert "10000" in (FAKE / "checkout/adet/modeling/condinst/dynamic_mask_head.py").read_text()  # untouched
    # stride-4 mask features: the release's x2 upsampling before the feature similarity becomes x1
    assert head.count("scale_factor=1,") == 2 and "scale_factor=2," not in head
    resolved["model"]["mask_feat_stride"] = 8
    assert not any("stride 4" in p.why for p in upstream.sim_patches(resolved))


def test_c2_patch_makes_the_backbone_return_res2(tmp_path, monkeypatch):
    """The patched FCOS backbone returns the FPN's levels plus the bottom-up res2, in outputs and shapes."""
    monkeypatch.syspath_prepend(str(FAKE / "site"))
    copy = upstream.private_copy(FAKE / "checkout", tmp_path / "copy")
    diff = upstream.apply_patches(copy, upstream.c2_input_patches())
    assert "+    backbone = FPNWithRes2(" in diff and "-    backbone = FPN(" in diff
    monkeypatch.syspath_prepend(str(copy))
    for name in [m for m in sys.modules if m == "adet" or m.startswith("adet.")]:
        monkeypatch.delitem(sys.modules, name)
    import torch
    from adet.modeling.backbone.fpn import build_fcos_resnet_fpn_backbone

    backbone = build_fcos_resnet_fpn_backbone({"FPN.IN_FEATURES": ["res3", "res4", "res5"]}, None)
    image = torch.arange(1024.0).reshape(1, 1, 32, 32)
    out = backbone(image)
    assert sorted(out) == ["p3", "p4", "p5", "res2"]
    assert torch.equal(out["res2"], torch.nn.functional.avg_pool2d(image, 4))
    assert backbone.output_shape()["res2"]["stride"] == 4
    assert not backbone.bottom_up._forward_hooks  # the hook lives for one call only
    assert "FPNWithRes2" not in (FAKE / "checkout/adet/modeling/backbone/fpn.py").read_text()  # untouched


def test_patch_refuses_a_checkout_that_differs(tmp_path, smoke_params):
    copy = upstream.private_copy(FAKE / "checkout", tmp_path / "copy")
    path = copy / "adet/modeling/condinst/condinst.py"
    path.write_text(path.read_text().replace("0.9999", "0.99"))
    with pytest.raises(InputError, match="differs from the reviewed release"):
        upstream.apply_patches(copy, upstream.sim_patches(smoke_params))


def test_cpp_fixes(tmp_path):
    csrc = tmp_path / "adet" / "layers" / "csrc" / "ops"
    csrc.mkdir(parents=True)
    (csrc / "op.h").write_text("if (input.type().is_cuda()) {\n")
    (csrc / "op_cpu.cpp").write_text('AT_DISPATCH_FLOATING_TYPES_AND_HALF(grad.type(), "op", [&] {\n')
    edits = upstream.fix_cpp_sources(tmp_path)
    assert edits == {"adet/layers/csrc/ops/op.h": 1, "adet/layers/csrc/ops/op_cpu.cpp": 1}
    assert (csrc / "op.h").read_text() == "if (input.is_cuda()) {\n"
    assert "grad.scalar_type()" in (csrc / "op_cpu.cpp").read_text()


def _real_like_clone(tmp_path: Path) -> Path:
    """The fake checkout dressed as the real SIM clone: .git, a Python 3.7 build/ tree and prebuilt ops,
    a wheel, a top-level datasets/coco link to the authors' disk, caches."""
    clone = tmp_path / "SIM"
    shutil.copytree(FAKE / "checkout", clone)
    (clone / "adet" / "_C.py").unlink()  # not built yet
    (clone / ".git").mkdir()
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / "build" / "lib.linux-x86_64-3.7" / "adet").mkdir(parents=True)
    (clone / "build" / "lib.linux-x86_64-3.7" / "adet" / "_C.cpython-37m-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (clone / "adet" / "_C.cpython-37m-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (clone / "torch_scatter-2.0.5+cu102-cp37-cp37m-linux_x86_64.whl").write_bytes(b"PK")
    (clone / "datasets").mkdir()
    (clone / "datasets" / "coco").symlink_to("/nonexistent/authors/coco")
    (clone / "adet" / "__pycache__").mkdir()
    (clone / "adet" / "__pycache__" / "__init__.cpython-37.pyc").write_bytes(b"")
    return clone


def test_setup_copies_a_real_like_clone_and_builds_it(tmp_path):
    clone = _real_like_clone(tmp_path)
    before = sorted(str(p.relative_to(clone)) for p in clone.rglob("*"))
    out = tmp_path / "built" / "SIM"
    summary = upstream.setup_checkout("sim", clone, out, sys.executable, echo=None)
    assert summary["built"] and summary["checkout"] == str(out.resolve())
    assert (out / "adet" / "data" / "datasets" / "__init__.py").is_file()  # a package, not the data link
    assert (out / "adet" / "_C.py").is_file()  # built in place
    for left_out in (".git", "build", "datasets", "adet/_C.cpython-37m-x86_64-linux-gnu.so",
                     "torch_scatter-2.0.5+cu102-cp37-cp37m-linux_x86_64.whl", "adet/__pycache__"):
        assert not (out / left_out).exists(), left_out
    assert "fake build: wrote adet/_C.py" in (out / "simbench_build.log").read_text()
    assert sorted(str(p.relative_to(clone)) for p in clone.rglob("*")) == before  # the clone is untouched
    record = json.loads((out / upstream.SETUP_RECORD).read_text())  # the copy has no .git: where it came from
    assert record["source"] == str(clone.resolve()) and record["cpp_fixes"] == summary["cpp_fixes"]
    assert upstream.provenance(out)["commit_of"] == str(clone.resolve())
    # the built copy passes the environment check, and a run's private copy keeps its built ops
    import os
    os.environ["PYTHONPATH"] = str(FAKE / "site")
    try:
        info = upstream.check_environment("sim", {"python": sys.executable, "sim": {"root": str(out)}})
    finally:
        del os.environ["PYTHONPATH"]
    assert info["versions"]["adet._C"]
    run_copy = upstream.private_copy(out, tmp_path / "run_copy")
    assert (run_copy / "adet" / "_C.py").is_file() and (run_copy / "adet" / "data" / "datasets").is_dir()


def test_setup_build_failure_names_the_log(tmp_path):
    clone = _real_like_clone(tmp_path)
    (clone / "setup.py").write_text("raise SystemExit('error: command gcc failed')\n")
    with pytest.raises(InputError, match="simbench_build.log.*building the C\\+\\+ ops failed"):
        upstream.setup_checkout("adelaidet", clone, tmp_path / "out", sys.executable, echo=None)


# -------------------------------------------------------------------------------- environment
def test_without_a_checkout_the_verb_explains_in_one_line(tmp_path, smoke_params, capsys):
    params_path = tmp_path / "params.yaml"
    import yaml
    params_path.write_text(yaml.safe_dump(smoke_params))
    assert cli_main(["upstream", "--params", str(params_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "upstream.adelaidet.root" in err
    assert cli_main(["upstream", "check", "--code", "sim", "--params", str(params_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "upstream.sim.root" in err and "lslrh/SIM" in err


def test_check_takes_the_interpreter_and_checkout_from_its_flags(fake_env, tmp_path, smoke_params, capsys):
    """`check --python PY --root BUILT`, as setup takes them, checks that interpreter and checkout when
    params name none (before, both flags were ignored and the check looked at params' empty roots)."""
    import yaml
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(smoke_params))
    assert cli_main(["upstream", "check", "--code", "sim", "--root", str(fake_env["sim"]),
                     "--python", sys.executable, "--params", str(params_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["root"] == str(fake_env["sim"].resolve()) and info["python"] == sys.executable
    assert info["versions"]["adet._C"]
    # the interpreter named is the one probed (here one that does not exist), not params' one
    assert cli_main(["upstream", "check", "--code", "sim", "--root", str(fake_env["sim"]),
                     "--python", str(tmp_path / "no_python"), "--params", str(params_path)]) == 2
    assert "no_python" in capsys.readouterr().err


def test_missing_detectron2_is_named(fake_env, monkeypatch):
    monkeypatch.delenv("PYTHONPATH")
    section = {"python": sys.executable, "adelaidet": {"root": str(fake_env["adelaidet"])}}
    with pytest.raises(InputError, match="detectron2 is missing.*pip install --no-build-isolation"):
        upstream.check_environment("adelaidet", section)


def test_unbuilt_ops_are_named(fake_env):
    (fake_env["adelaidet"] / "adet" / "_C.py").unlink()
    section = {"python": sys.executable, "adelaidet": {"root": str(fake_env["adelaidet"])}}
    with pytest.raises(InputError, match=r"adet\._C is missing.*simbench upstream setup"):
        upstream.check_environment("adelaidet", section)


def test_a_third_party_import_of_the_trainer_is_named(fake_env):
    """AdelaiDet's tools/train_net.py imports adet.evaluation, which needs shapely: the check names it."""
    (fake_env["adelaidet"] / "adet" / "evaluation" / "__init__.py").write_text("import shapely_not_installed_x\n")
    section = {"python": sys.executable, "adelaidet": {"root": str(fake_env["adelaidet"])}}
    with pytest.raises(InputError, match=r"adet\.evaluation is missing.*pip install shapely_not_installed_x"):
        upstream.check_environment("adelaidet", section)


def test_sim_without_torch_scatter_passes_the_check(fake_env):
    """The real package adet imports torch_scatter (adet.modeling) before adet._C loads: the probe stands in
    for it, reports it missing, and the run patches the import."""
    (fake_env["sim"] / "adet" / "__init__.py").write_text("from adet.modeling.condinst import dynamic_mask_head\n")
    head = fake_env["sim"] / "adet" / "modeling" / "condinst" / "dynamic_mask_head.py"
    assert "from torch_scatter import scatter_mean" in head.read_text()
    section = {"python": sys.executable, "sim": {"root": str(fake_env["sim"])}}
    info = upstream.check_environment("sim", section)
    assert info["versions"]["torch_scatter"] is None and info["versions"]["adet._C"]


# ------------------------------------------------------------------------------ the whole path
def test_adelaidet_run_end_to_end(fake_env, smoke_params, tmp_path):
    params = _params(smoke_params, fake_env, {"boxinst_orig_s0": {"code": "adelaidet", "seed": 3,
                                                                  "set": {"model.backbone": "resnet50"}}})
    echo = io.StringIO()
    record = upstream.run_upstream(params, "boxinst_orig_s0", echo=echo)
    run_dir = Path(params["train"]["runs_dir"]) / "boxinst_orig_s0"
    assert "fake d2.utils.events: iter: 0" in echo.getvalue()  # the log is streamed ...
    assert "fake evaluator" in (run_dir / "upstream" / "log.txt").read_text()  # ... and kept
    assert record["segm"]["AP"] == pytest.approx(1.0) and record["external"] and record["original_code"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "boxinst" and metrics["seed"] == 3 and metrics["profile"] == "smoke"
    assert (run_dir / "segm.json").is_file() and (run_dir / "bbox.json").is_file()
    fake = json.loads((run_dir / "upstream" / "output" / "fake_record.json").read_text())
    assert fake["opts"]["SEED"] == "3" and fake["opts"]["MODEL.RESNETS.DEPTH"] == "50"
    assert fake["opts"]["MODEL.DEVICE"] in ("cpu", "cuda") and fake["threads"] == "1"
    assert fake["datasets"]["simbench_val"]["json_file"].endswith("val.json")
    run = json.loads((run_dir / "run.json").read_text())
    assert run["upstream"]["opts"][run["upstream"]["opts"].index("SOLVER.MAX_ITER") + 1] == str(
        params["train"]["max_iter"])
    # the smoke profile's stride-4 mask branch reads C2: a private copy with the backbone patch
    assert params["model"]["mask_feat_stride"] == 4 and params["model"]["mask_stride4_input"] == "c2"
    assert run["upstream"]["code"] == "adelaidet" and run["upstream"]["private_copy"]
    assert "FPNWithRes2" in run["patch_diff"]
    assert fake["backbone"]["outputs"]["res2"][-2:] == [8, 8] and fake["backbone"]["strides"]["res2"] == 4
    assert sorted(fake["backbone"]["outputs"]) == ["p3", "p4", "p5", "res2"]


def test_adelaidet_run_at_stride_8_uses_the_checkout_as_is(fake_env, smoke_params):
    params = _params(smoke_params, fake_env, {"boxinst_orig_s0": {"code": "adelaidet", "set": {
        "model.backbone": "resnet50", "model.mask_feat_stride": 8}}})
    upstream.run_upstream(params, "boxinst_orig_s0", echo=None)
    run = json.loads((Path(params["train"]["runs_dir"]) / "boxinst_orig_s0" / "run.json").read_text())
    assert run["upstream"]["private_copy"] is None and run["patch_diff"] is None


def test_sim_run_patches_a_private_copy(fake_env, smoke_params):
    params = _params(smoke_params, fake_env, {"sim_orig_s0": {"code": "sim", "set": {
        "model.backbone": "resnet50", "train.max_iter": 700, "train.steps": [525, 630]}}})
    upstream.run_upstream(params, "sim_orig_s0", echo=None)
    run_dir = Path(params["train"]["runs_dir"]) / "sim_orig_s0"
    fake = json.loads((run_dir / "upstream" / "output" / "fake_record.json").read_text())
    assert fake["sim"]["start"] == 78 and fake["sim"]["span"] == 2100
    assert fake["sim"]["alpha"] == params["sim"]["ema_momentum"]
    assert fake["sim"]["momentum"] == params["sim"]["proto_momentum"]
    assert fake["sim"]["scatter_mean"] == [2.0, 5.0]  # the stand-in (torch_scatter is not installed here)
    assert fake["sim"]["feature_size"] == ([4, 4] if params["model"]["mask_feat_stride"] == 4 else [8, 8])
    run = json.loads((run_dir / "run.json").read_text())
    assert "10000 -> 78" in " ".join(run["upstream"]["patch"]) and run["patch_diff"]
    assert (run_dir / "upstream" / "patch.diff").read_text() == run["patch_diff"]
    assert "10000" in (fake_env["sim"] / "adet/modeling/condinst/dynamic_mask_head.py").read_text()


def test_sim_fix_is_applied_only_when_a_run_names_it(fake_env, smoke_params):
    """`fixes: [focal_on_logits]` patches the private copy's focal loss to take logits; runs without it keep
    the release's (BCE-with-logits on probabilities: 0.75 * log(1 + e^1) / 2 for a saturated pixel)."""
    params = _params(smoke_params, fake_env, {
        "sim_orig_s0": {"code": "sim", "set": {"model.backbone": "resnet50"}},
        "sim_orig_fixed_s0": {"code": "sim", "set": {"model.backbone": "resnet50"}, "fixes": ["focal_on_logits"]}})
    runs_dir = Path(params["train"]["runs_dir"])
    losses = {}
    for name in ("sim_orig_s0", "sim_orig_fixed_s0"):
        upstream.run_upstream(params, name, echo=None)
        losses[name] = json.loads((runs_dir / name / "upstream/output/fake_record.json").read_text())["sim"][
            "focal_losses"]
    released = 0.75 * math.log(1 + math.e) / 2  # BCE-with-logits(p = 1, target 0), focal factor 1
    assert losses["sim_orig_s0"] == pytest.approx([released, released], rel=1e-5)
    assert losses["sim_orig_fixed_s0"] == pytest.approx([0.75 * 20.0 / 2] * 2, rel=1e-5)  # log(1 + e^20) ~ 20
    run = json.loads((runs_dir / "sim_orig_fixed_s0" / "run.json").read_text())
    assert run["upstream"]["fixes"] == ["focal_on_logits"]
    assert any("focal_on_logits" in why for why in run["upstream"]["patch"])
    assert "mask_focal_loss(mask_logits," in run["patch_diff"]
    assert json.loads((runs_dir / "sim_orig_s0" / "run.json").read_text())["upstream"]["fixes"] == []
    assert "mask_focal_loss(mask_scores," in (fake_env["sim"] / "adet/modeling/condinst/dynamic_mask_head.py").read_text()
    # a fix of another code base, or an unknown one, is refused before anything runs
    for fixes in (["no_such_fix"], "focal_on_logits"):
        bad = _params(smoke_params, fake_env, {"u": {"code": "sim", "fixes": fixes}})
        with pytest.raises(InputError, match="fixes must be a list of fixes for sim.*focal_on_logits"):
            upstream.resolve_upstream_run(bad, "u")
    bad = _params(smoke_params, fake_env, {"u": {"code": "adelaidet", "fixes": ["focal_on_logits"]}})
    with pytest.raises(InputError, match="known: none"):
        upstream.resolve_upstream_run(bad, "u")


def test_sim_copy_paste_fix_and_prototype_ablation(fake_env, smoke_params):
    """`fixes: [paste_zero_scores]` keeps the release's copy-paste draw alive when every score is 0;
    `ablations: [without_prototypes]` makes its pseudo label the teacher's score alone (0.5 * 1 + 0.5 * 0 -> 0)."""
    params = _params(smoke_params, fake_env, {
        "plain": {"code": "sim", "set": {"model.backbone": "resnet50"}},
        "edited": {"code": "sim", "set": {"model.backbone": "resnet50"}, "fixes": ["paste_zero_scores"],
                   "ablations": ["without_prototypes"]}})
    runs_dir = Path(params["train"]["runs_dir"])
    record = {}
    for name in ("plain", "edited"):
        upstream.run_upstream(params, name, echo=None)
        record[name] = json.loads((runs_dir / name / "upstream/output/fake_record.json").read_text())["sim"]
    assert record["plain"]["paste_all_zero"] == "Total of weights must be greater than zero"
    assert record["edited"]["paste_all_zero"] in (0, 1)
    assert record["plain"]["pseudo_label"] == 0.5 and record["edited"]["pseudo_label"] == 0.0
    run = json.loads((runs_dir / "edited" / "run.json").read_text())["upstream"]
    assert run["fixes"] == ["paste_zero_scores"] and run["ablations"] == ["without_prototypes"]
    assert any("without_prototypes" in why for why in run["patch"])
    bad = _params(smoke_params, fake_env, {"u": {"code": "adelaidet", "ablations": ["without_prototypes"]}})
    with pytest.raises(InputError, match="ablations must be a list of ablations for adelaidet"):
        upstream.resolve_upstream_run(bad, "u")


def test_sim_fixes_of_the_paste_dice_and_the_teacher_start(fake_env, smoke_params):
    """`paste_dice_over_pasted`: L_paste's Dice over the pasted rows only (the release adds 1 per row not pasted:
    one perfect pasted row beside one not pasted gives 0.5, fixed 0); `teacher_from_student`: the release's
    teacher modules start as copies of the student's instead of a draw of their own."""
    params = _params(smoke_params, fake_env, {
        "plain": {"code": "sim", "set": {"model.backbone": "resnet50"}},
        "aligned": {"code": "sim", "set": {"model.backbone": "resnet50"},
                    "fixes": ["focal_on_logits", "paste_dice_over_pasted", "teacher_from_student"]}})
    runs_dir = Path(params["train"]["runs_dir"])
    record = {}
    for name in ("plain", "aligned"):
        upstream.run_upstream(params, name, echo=None)
        record[name] = json.loads((runs_dir / name / "upstream/output/fake_record.json").read_text())["sim"]
    assert record["plain"]["paste_dice"] == pytest.approx(0.5, abs=1e-5)
    assert record["aligned"]["paste_dice"] == pytest.approx(0.0, abs=1e-5)
    assert record["plain"]["teacher_equals_student"] is False
    assert record["aligned"]["teacher_equals_student"] is True
    run = json.loads((runs_dir / "aligned" / "run.json").read_text())["upstream"]
    assert run["fixes"] == ["focal_on_logits", "paste_dice_over_pasted", "teacher_from_student"]
    assert {why.split(":")[0] for why in run["patch"] if why.startswith("fix ")} == {
        "fix focal_on_logits", "fix paste_dice_over_pasted", "fix teacher_from_student"}


def test_failed_upstream_run_is_one_line_with_the_log_tail(fake_env, smoke_params, monkeypatch):
    monkeypatch.setenv("FAKE_UPSTREAM_FAIL", "1")
    params = _params(smoke_params, fake_env, {"u": {"code": "adelaidet", "set": {"model.backbone": "resnet50"}}})
    with pytest.raises(InputError, match="upstream run failed.*no kernel image"):
        upstream.run_upstream(params, "u", echo=None)


def test_cli_and_report_rows(fake_env, smoke_params, tmp_path, capsys):
    """simbench upstream --run through the CLI, then the report's 'reimplementation vs original code' rows."""
    import yaml

    from experiments.report import upstream_pairs

    params = _params(smoke_params, fake_env, {"boxinst_orig_s0": {"code": "adelaidet",
                                                                  "set": {"model.backbone": "resnet50"}}})
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    assert cli_main(["upstream", "--run", "boxinst_orig_s0", "--params", str(params_path), "--quiet"]) == 0
    assert "segm  AP=100.0" in capsys.readouterr().out
    runs_dir = Path(params["train"]["runs_dir"])
    # a reimplementation run with metrics of its own (here: the same results, so the difference is 0)
    reimpl = runs_dir / "boxinst_s0"
    reimpl.mkdir(parents=True)
    metrics = json.loads((runs_dir / "boxinst_orig_s0" / "metrics.json").read_text())
    metrics.update(external=False, original_code=False, run="boxinst_s0")
    (reimpl / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(runs_dir / "boxinst_orig_s0" / "segm.json", reimpl / "segm.json")
    pairs = upstream_pairs(params, runs_dir)
    assert [(p["original"].name, p["reimplementation"].name) for p in pairs] == [("boxinst_orig_s0", "boxinst_s0")]

    from reports import tables
    from reports.tables import Setting
    text = tables.original_code_table([{**p, "interval": {"diff": 0.0, "low": -0.01, "high": 0.01}} for p in pairs],
                                      Setting("smoke", "synthetic", "val"))
    assert "original code" in text and "reimplementation vs original code" in text.lower()
    assert "100.0" in text and "[$-1.0$, $+1.0$]" in text
    # a fixed original is marked in its row; the table keeps its own label
    fixed = tables.original_code_table([{**p, "fixes": ["focal_on_logits"]} for p in pairs],
                                       Setting("smoke", "synthetic", "val"))
    assert "original code, fix focal\\_on\\_logits" in fixed and "\\label{tab:original-code}" in fixed
    ablated = tables.original_code_table([{**p, "fixes": ["a"], "ablations": ["without_prototypes"]} for p in pairs],
                                         Setting("smoke", "synthetic", "val"))
    assert "original code, fix a, without\\_prototypes" in ablated

    from experiments.report import run_report
    params["report"]["data_dirs"]["synthetic"] = params["data"]["root"]
    params["report"]["bootstrap_resamples"] = 20
    params["runs"] = {"boxinst_s0": {"method": "boxinst", "seed": 0}}
    run_report(params, runs_dir, tmp_path / "out")
    table = next((tmp_path / "out" / "tables").glob("original_code_*.tex")).read_text()
    assert "original code" in table and "boxinst\\_orig\\_s0" in table and "[$+0.0$, $+0.0$]" in table
    boot = json.loads((tmp_path / "out" / "bootstrap.json").read_text())
    assert any(t["table"] == "original_code" for t in boot["tables"])
    # without the ground truth (data_dirs resolve against the runs folder's parent) the rows stay, without
    # intervals, and the report says why
    params["report"]["data_dirs"]["synthetic"] = str(tmp_path / "no_data_here")
    run_report(params, runs_dir, tmp_path / "out_no_gt")
    assert "[$" not in next((tmp_path / "out_no_gt" / "tables").glob("original_code_*.tex")).read_text()
    assert "no bootstrap interval in the reimplementation vs original code table" in \
        (tmp_path / "out_no_gt" / "report.tex").read_text()


def test_cli_run_takes_set_overrides(fake_env, smoke_params, tmp_path, capsys):
    """--run names an upstream_runs entry, not a `runs` one: --set still applies (and train.seed is refused)."""
    import yaml

    params = _params(smoke_params, fake_env, {"u": {"code": "adelaidet", "seed": 2,
                                                    "set": {"model.backbone": "resnet50"}}})
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    assert cli_main(["upstream", "--run", "u", "--params", str(params_path), "--quiet",
                     "--set", "train.max_iter=30", "--set", "train.steps=[20]"]) == 0
    fake = json.loads((Path(params["train"]["runs_dir"]) / "u" / "upstream" / "output" / "fake_record.json").read_text())
    assert fake["opts"]["SOLVER.MAX_ITER"] == "30" and fake["opts"]["SOLVER.STEPS"] == "(20,)"
    assert fake["opts"]["SEED"] == "2"
    capsys.readouterr()
    assert cli_main(["upstream", "--run", "u", "--params", str(params_path), "--set", "train.seed=5"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "train.seed" in err


def test_relative_runs_dir(fake_env, smoke_params, tmp_path, monkeypatch):
    """runs_dir relative to the project (as in every profile): the launcher runs in runs/<run>/upstream, so the
    config of the SIM private copy must reach it as an absolute path (it did not, and detectron2 stopped)."""
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    params = _params(smoke_params, fake_env, {"sim_orig_s0": {"code": "sim", "set": {"model.backbone": "resnet50"}}})
    params["train"]["runs_dir"] = "runs"
    upstream.run_upstream(params, "sim_orig_s0", echo=None)
    run_dir = project / "runs" / "sim_orig_s0"
    fake = json.loads((run_dir / "upstream" / "output" / "fake_record.json").read_text())
    config = Path(fake["config_file"])
    assert config.is_absolute() and config.is_file()
    assert config.is_relative_to(run_dir / "upstream" / "code")  # the patched private copy's config
    assert (run_dir / "metrics.json").is_file()


def test_report_pools_the_seeds_of_a_comparison(fake_env, smoke_params, tmp_path):
    """Two seeds per side: a row of seed means with the two-level interval after the per-seed rows.

    The originals score AP 1.0 with both seeds; simbench's seed 1 loses half its detections. Each per-seed
    comparison holds its trained models fixed, so the image interval of the seed means excludes 0; the
    two-level interval also draws simbench's seeds (both s0 with probability 1/4: no difference) and does not.
    """
    from experiments.report import run_report

    entry = {"code": "adelaidet", "set": {"model.backbone": "resnet50"}}
    params = _params(smoke_params, fake_env, {"boxinst_orig_s0": {**entry, "seed": 0},
                                              "boxinst_orig_s1": {**entry, "seed": 1}})
    upstream.run_upstream(params, "boxinst_orig_s0", echo=None)
    runs_dir = Path(params["train"]["runs_dir"])
    source = runs_dir / "boxinst_orig_s0"
    segm = json.loads((source / "segm.json").read_text())
    for name, seed, results in (("boxinst_orig_s1", 1, segm), ("boxinst_s0", 0, segm),
                                ("boxinst_s1", 1, segm[::2])):
        (runs_dir / name).mkdir()
        metrics = json.loads((source / "metrics.json").read_text())
        metrics.update(run=name, seed=seed, external=name.startswith("boxinst_orig"),
                       original_code=name.startswith("boxinst_orig"))
        (runs_dir / name / "metrics.json").write_text(json.dumps(metrics))
        (runs_dir / name / "segm.json").write_text(json.dumps(results))
    params["runs"] = {"boxinst_s0": {"method": "boxinst", "seed": 0}, "boxinst_s1": {"method": "boxinst", "seed": 1}}
    params["report"]["data_dirs"]["synthetic"] = params["data"]["root"]
    params["report"]["bootstrap_resamples"] = 200
    run_report(params, runs_dir, tmp_path / "out")
    table = next((tmp_path / "out" / "tables").glob("original_code_*.tex")).read_text()
    assert "mean of 2 seeds" in table and "boxinst\\_orig\\_s0, boxinst\\_orig\\_s1" in table
    assert table.count("mean of 2 seeds") == 2  # one line per side, once
    assert r"\textit{mean of n seeds}" in table and "spread between training seeds" in table
    boot = json.loads((tmp_path / "out" / "bootstrap.json").read_text())
    pooled = [t for t in boot["tables"] if t["table"] == "original_code_seeds"]
    assert len(pooled) == 1 and pooled[0]["n_seeds"] == {"a": 2, "b": 2}
    item = pooled[0]["intervals"][0]
    assert item["diff"] > 0 and item["image"]["low"] > 0 and item["image"]["excludes_zero"]
    assert item["two_level"]["low"] <= 1e-12 and not item["two_level"]["excludes_zero"]


# ------------------------------------------------------------------------------ the same-weights cross-check
def test_crosscheck_refuses_sim_and_a_bad_batch_and_names_a_failed_original(fake_env, smoke_params):
    from baselines.crosscheck import run_crosscheck

    r18 = {"model.backbone": "resnet18"}
    params = _params(smoke_params, fake_env, {"sim_run": {"code": "sim", "set": r18},
                                              "boxinst_run": {"code": "adelaidet", "set": r18}})
    with pytest.raises(InputError, match="code: adelaidet"):
        run_crosscheck(params, "sim_run")
    with pytest.raises(InputError, match="--images"):
        run_crosscheck(params, "boxinst_run", num_images=0)
    # the fake detectron2 builds no model: the driver fails and the error names its log, nothing is compared
    with pytest.raises(InputError, match="forward/backward failed") as err:
        run_crosscheck(params, "boxinst_run", num_images=2)
    log = Path(str(err.value).split(":")[0])
    assert log.name == "log.txt" and log.is_file()
    assert not (log.parent / "crosscheck.json").exists() and not (log.parent / "original.pt").exists()


def test_adelaidet_run_from_simbench_initial_weights(fake_env, smoke_params):
    from baselines.crosscheck import adelaidet_name, simbench_initial_weights

    r18 = {"model.backbone": "resnet18", "model.mask_branch_norm": "BN", "model.gn_groups": 32}
    params = _params(smoke_params, fake_env, {"same_start": {"code": "adelaidet", "seed": 2, "init": "simbench",
                                                             "set": r18}})
    upstream.run_upstream(params, "same_start", echo=None)
    run_dir = Path(params["train"]["runs_dir"]) / "same_start"
    opts = json.loads((run_dir / "upstream" / "output" / "fake_record.json").read_text())["opts"]
    assert opts["MODEL.WEIGHTS"] == str((run_dir / "upstream" / "simbench_init.pth").resolve())
    assert opts["MODEL.PIXEL_STD"].startswith("[57.375")  # ImageNet std in BGR order, 0-255
    saved = torch.load(opts["MODEL.WEIGHTS"])["model"]
    _, resolved = upstream.resolve_upstream_run(params, "same_start")
    ours = simbench_initial_weights(resolved, num_classes=6)  # the seed-2 start of simbench's own run
    assert torch.equal(saved[adelaidet_name("head.controller.weight")], ours["head.controller.weight"])
    assert torch.equal(saved["backbone.bottom_up.stem.conv1.weight"], ours["backbone.conv1.weight"].flip(1))
    params["upstream_runs"]["bad"] = {"code": "sim", "init": "simbench"}
    with pytest.raises(InputError, match="init must be 'simbench'.*for sim"):
        upstream.run_upstream(params, "bad", echo=None)
