"""Profiles: complete flat params sets whose paper-scale numbers match the papers."""
from __future__ import annotations

import pytest

from sim_core.config import available_profiles, load_params, profile_path, reference_params

PAPER = {
    # name: (backbone, max_iter, steps)
    "coco_r50_1x": ("resnet50", 90000, [60000, 80000]),
    "coco_r101_1x": ("resnet101", 90000, [60000, 80000]),
    "coco_r101_3x": ("resnet101", 270000, [210000, 250000]),
    "coco_r101dcn_bifpn_3x": ("resnet101_dcn", 270000, [210000, 250000]),
    "coco_swinb_3x": ("swin_b", 270000, [210000, 250000]),
}


def _keys(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in node.items():
        if prefix + key in ("runs", "upstream_runs", "report.paper_settings", "report.data_dirs"):
            out.add(prefix + key)
        elif isinstance(value, dict):
            out |= _keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("name", available_profiles())
def test_every_profile_is_complete_and_valid(name):
    params = load_params(profile_path(name))
    assert params["profile"] == name
    assert _keys(params) == _keys(reference_params()), "profiles are complete, flat sets with the same keys"
    assert params["runs"], "a profile declares its runs"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_coco_profiles_match_the_papers(name):
    backbone, max_iter, steps = PAPER[name]
    p = load_params(profile_path(name))
    assert p["model"]["backbone"] == backbone
    assert p["train"]["batch_size"] == 16
    assert p["train"]["max_iter"] == max_iter and p["train"]["steps"] == steps
    assert p["data"]["train_sizes"] == [640, 672, 704, 736, 768, 800]
    assert p["data"]["test_size"] == 800 and p["data"]["max_size"] == 1333
    assert p["model"]["fpn_levels"] == [3, 4, 5, 6, 7]
    assert p["boxinst"]["ignore_bottom_px"] == 10
    assert p["boxinst"]["pairwise_warmup_frac"] == pytest.approx(10000 / 90000, abs=1e-6)
    assert p["sim"]["pseudo_start_frac"] == pytest.approx(10000 / 90000, abs=1e-6)
    if name == "coco_swinb_3x":
        assert (p["train"]["optimizer"], p["train"]["lr"]) == ("adamw", 0.0001)
    else:
        assert (p["train"]["optimizer"], p["train"]["lr"]) == ("sgd", 0.01)
    if name == "coco_r101dcn_bifpn_3x":
        assert p["model"]["neck"] == "bifpn" and p["model"]["dcn_interval"] == 3


@pytest.mark.parametrize("name", ["voc_r50", "voc_r101"])
def test_voc_profiles(name):
    p = load_params(profile_path(name))
    assert p["data"]["dataset"] == "voc" and p["evaluate"]["voc_metrics"] is True
    assert (p["train"]["batch_size"], p["train"]["lr"]) == (16, 0.01)
    assert p["boxinst"]["ignore_bottom_px"] == 0
    assert p["model"]["backbone"] == {"voc_r50": "resnet50", "voc_r101": "resnet101"}[name]


def test_sim_paper_defaults_in_paper_profiles():
    s = load_params(profile_path("coco_r50_1x"))["sim"]
    assert (s["variant"], s["alpha"], s["num_prototypes"], s["tau"], s["mu"]) == ("paper", 0.5, 10, 1.0, 5.0)
    assert (s["ema_momentum"], s["proto_momentum"], s["bank_size"], s["paste_prob"]) == (0.9999, 0.999, 100, 0.5)
    assert (s["lambda_pseudo"], s["lambda_paste"], s["sinkhorn_eps"], s["sinkhorn_iters"]) == (0.5, 1.0, 0.05, 3)


# LiWentomng/boxlevelset configs/boxlevelset/{coco,voc}/box_levelset_*_r50_fpn_3x.py: 36 epochs, steps at
# epochs 27 and 33; COCO 117,266 train2017 images with annotations / batch 16 -> 7330 iterations an epoch,
# VOC train_aug 10,582 / batch 8 -> 1323.
OWN_RECIPE = {
    # name: (lr, batch, iterations per epoch, warm-up iterations, warm-up ratio, test mask threshold)
    "coco_r50_boxlevelset_own": (1e-4, 16, 7330, 2000, 0.01, 0.55),
    "voc_r50_boxlevelset_own": (5e-5, 8, 1323, 2000, 0.001, 0.70),
}


def test_boxlevelset_own_recipe():
    for name, (lr, batch, epoch, warmup, ratio, mask_thresh) in OWN_RECIPE.items():
        p = load_params(profile_path(name))
        t = p["train"]
        assert (t["optimizer"], t["lr"], t["weight_decay"], t["grad_clip"]) == ("adamw", lr, 0.1, 1.0)
        assert (t["batch_size"], t["batch_per_process"]) == (batch, 2)
        assert t["max_iter"] == 36 * epoch and t["steps"] == [27 * epoch, 33 * epoch]
        assert (t["warmup_iters"], t["warmup_factor"]) == (warmup, ratio)
        assert t["norm_weight_decay"] == 0.0
        assert p["evaluate"]["mask_thresh"] == mask_thresh
        assert p["model"]["pretrained"] == "ResNet50_Weights.IMAGENET1K_V2"  # resnet50-11ad3fa6.pth
        assert (p["model"]["backbone"], p["model"]["freeze_at"]) == ("resnet50", 2)  # mmdet frozen_stages=1
    b = load_params(profile_path("coco_r50_1x"))["boxlevelset"]
    assert (b["projection_weight"], b["levelset_img_weight"], b["levelset_feat_weight"]) == (3.0, 0.05, 5.0)
    assert b["levelset_gamma"] == 1e-4


def test_demo_runs_two_seeds_of_each_main_method_and_ablations_in_their_own_profile():
    runs = load_params(profile_path("demo"))["runs"]
    seeds: dict[str, set[int]] = {}
    for r in runs.values():
        assert not r.get("set"), "the demo's runs are the methods' defaults"
        seeds.setdefault(r["method"], set()).add(r["seed"])
    assert seeds == {"mask": {0, 1}, "boxmask": {0}, "boxinst": {0, 1}, "boxlevelset": {0, 1}, "sim": {0, 1}}
    demo, ablations = load_params(profile_path("demo")), load_params(profile_path("demo_ablations"))
    extra = {k: v for k, v in ablations["runs"].items() if k not in demo["runs"]}
    assert {k: v for k, v in ablations["runs"].items() if k in demo["runs"]} == demo["runs"]
    sets = [r.get("set", {}) for r in extra.values()]
    assert {"sim.copy_paste": False} in sets and {"sim.alpha": 0.0} in sets and {"sim.alpha": 1.0} in sets
    assert {"sim.num_prototypes": 1} in sets
    same = {k: v for k, v in ablations.items() if k not in ("profile", "runs")}
    assert same == {k: v for k, v in demo.items() if k not in ("profile", "runs")}, "only the runs differ"


PAPER_NAMES = [n for n in available_profiles() if n.startswith(("coco_r", "coco_swin", "voc_"))]


@pytest.mark.parametrize("name", available_profiles())
def test_weights_warmup_and_thresh_with_ctr(name):
    p = load_params(profile_path(name))
    # AdelaiDet's BoxInst configs: FCOS.THRESH_WITH_CTR True; smoke's 6 iterations leave class x centerness
    # below the score threshold everywhere (no predictions, nothing for its pipeline test to compare)
    assert p["model"]["thresh_with_ctr"] is (name != "smoke")
    if name in PAPER_NAMES:
        expected = "ResNet50_Weights.IMAGENET1K_V2" if name in OWN_RECIPE else "imagenet"
        assert p["model"]["pretrained"] == expected
        assert p["boxinst"]["pairwise_warmup_iters"] == 10000  # BOXINST.PAIRWISE.WARMUP_ITERS, every schedule
    else:
        assert name in ("demo", "demo_ablations", "smoke", "coco128", "upstream_demo", "upstream_converge")
        assert p["model"]["pretrained"] == "none"
        assert p["boxinst"]["pairwise_warmup_iters"] is None



def test_upstream_demo_is_the_demo_with_the_originals_settings_on_both_sides():
    """upstream_demo: the demo's data and schedule; R-18 from scratch, SGD, mask branch on P3 (stride 8) on both
    sides; heads matched; the originals beside simbench's BoxInst and SIM (docs/upstream.md)."""
    from baselines.upstream import adelaidet_function_differences, translate

    demo, p = load_params(profile_path("demo")), load_params(profile_path("upstream_demo"))
    assert p["data"] == demo["data"] and p["synthetic"] == demo["synthetic"]  # the demo's 128 px synthetic data
    for key in ("max_iter", "steps", "batch_size", "warmup_iters", "warmup_factor", "gamma", "momentum", "threads"):
        assert p["train"][key] == demo["train"][key], key
    assert (p["model"]["backbone"], p["model"]["pretrained"]) == ("resnet18", "none")
    assert p["model"]["mask_feat_stride"] == 8  # AdelaiDet's mask branch reads P3
    assert (p["train"]["optimizer"], p["train"]["lr"]) == ("sgd", 0.01)  # detectron2's only solver
    assert p["train"]["weight_decay"] == 0.0001 and p["train"]["norm_weight_decay"] == 0.0
    assert p["train"]["runs_dir"] == "runs"  # dvc.yaml declares runs/<run>/... for every stage
    assert p["upstream"]["match_heads"] is True and p["upstream"]["scale_constants"] is True
    assert {n: r["method"] for n, r in p["runs"].items()} == {"mask_s0": "mask", "boxinst_s0": "boxinst",
                                                              "sim_s0": "sim", "sim_relfocal_s0": "sim",
                                                              "sim_paper_s0": "sim"}
    # the runs compared with the originals use the shared settings; SIM's are the release's recipe (the
    # variant simbench keeps for it), the paper's recipe is the one extra run
    assert all(not r.get("set") for n, r in p["runs"].items() if n not in ("sim_paper_s0", "sim_relfocal_s0"))
    assert p["sim"]["variant"] == "released_code" and p["sim"]["focal_on_probabilities"] is False
    assert p["runs"]["sim_paper_s0"]["set"] == {"sim.variant": "paper"}
    # the release as it is, beside simbench with the release's focal loss; the release with that loss fixed,
    # beside simbench's own (docs/upstream.md 0.5)
    assert p["runs"]["sim_relfocal_s0"]["set"] == {"sim.focal_on_probabilities": True}
    assert p["upstream_runs"] == {
        "boxinst_orig_s0": {"code": "adelaidet", "seed": 0},
        "sim_orig_s0": {"code": "sim", "seed": 0, "compare": "sim_relfocal_s0"},
        "sim_orig_fixed_s0": {"code": "sim", "seed": 0, "fixes": ["focal_on_logits"], "compare": "sim_s0"}}
    # nothing is left unequal in the settings; what differs is how the functions are computed (the four
    # settings of docs/upstream.md 0.10 at simbench's defaults, listed in run.json)
    for code in ("adelaidet", "sim"):
        opts, differences = translate(dict(p, run="x"), code, num_classes=p["synthetic"]["num_classes"])
        assert differences == adelaidet_function_differences(p["model"], p["boxinst"]), differences
        o = dict(zip(opts[0::2], opts[1::2]))
        assert o["MODEL.RESNETS.DEPTH"] == "18" and o["MODEL.RESNETS.NORM"] == "BN" and o["MODEL.WEIGHTS"] == '""'
        assert o["MODEL.FPN.OUT_CHANNELS"] == str(p["model"]["fpn_channels"])
        assert o["SOLVER.BASE_LR"] == "0.01" and o["SOLVER.WEIGHT_DECAY_NORM"] == "0.0"
    paper = dict(p, run="x", sim=dict(p["sim"], variant="paper"))  # simbench's paper recipe against the release
    assert [d[:36] for d in translate(paper, "sim", num_classes=6)[1]][-1:] == ["SIM: the release's own recipe (focal"]


def test_upstream_converge_is_upstream_demo_with_the_measured_changes():
    """upstream_converge: upstream_demo with the changes measured in docs/upstream.md 0.6: stride-4 mask
    branch on P2, four times the schedule, SIM's momenta rescaled; nothing unequal between the two sides."""
    from baselines.upstream import adelaidet_function_differences, sim_patches, translate

    demo, p = load_params(profile_path("upstream_demo")), load_params(profile_path("upstream_converge"))
    assert p["data"] == demo["data"] and p["synthetic"] == demo["synthetic"]
    changed = {"mask_feat_stride": 4, "mask_stride4_input": "p2"}
    assert {k: v for k, v in p["model"].items() if demo["model"][k] != v} == changed
    assert (p["train"]["max_iter"], p["train"]["steps"], p["train"]["warmup_iters"]) == (2800, [2100, 2520], 200)
    for key in ("optimizer", "lr", "batch_size", "weight_decay", "norm_weight_decay", "momentum"):
        assert p["train"][key] == demo["train"][key], key
    # the release's momenta for 90000 iterations, rescaled to 2800 as upstream_demo's are to 700
    assert p["sim"]["ema_momentum"] == pytest.approx(1 - 1e-4 * 90000 / 2800, abs=1e-6)
    assert p["sim"]["proto_momentum"] == pytest.approx(1 - 1e-3 * 90000 / 2800, abs=1e-6)
    assert p["upstream_runs"]["sim_orig_fixed_s0"]["fixes"] == ["focal_on_logits", "paste_zero_scores"]
    for code in ("adelaidet", "sim"):
        opts, differences = translate(dict(p, run="x"), code, num_classes=p["synthetic"]["num_classes"])
        assert differences == adelaidet_function_differences(p["model"], p["boxinst"]), differences
        assert len(differences) == 4  # the exact runs' five settings remove them (docs/upstream.md 0.10)
        exact = p["runs"]["boxinst_exact_s1"]["set"]
        assert exact == p["runs"]["sim_exact_s0"]["set"] and len(exact) == 5
        assert dict(zip(opts[0::2], opts[1::2]))["MODEL.CONDINST.MASK_BRANCH.IN_FEATURES"] == "['p2', 'p3', 'p4', 'p5']"
    assert any("stride 4" in patch.why for patch in sim_patches(p))
