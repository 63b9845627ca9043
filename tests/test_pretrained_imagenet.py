"""model.pretrained: imagenet / none / files, the offline stop, MSRA pickles, run.json. Never downloads."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

from sim_core.errors import InputError
from sim_core.model import backbone as backbone_mod
from sim_core.model import pretrained
from sim_core.model.msra_weights import RGB_STD, apply_msra_conventions, read_msra_state_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """torch hub's cache in tmp_path and a download that fails like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, dst):
        raise OSError(f"<urlopen error [Errno -3] Temporary failure in name resolution> ({url})")

    monkeypatch.setattr(pretrained, "_download", offline)


def tiny_resnet(**kw) -> ResNet:
    """A small torchvision ResNet with Bottlenecks (one per stage), as torchvision builds resnet50."""
    return ResNet(Bottleneck, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d, **kw)


@pytest.fixture
def tiny_builders(monkeypatch):
    monkeypatch.setitem(backbone_mod.RESNET_BUILDERS, 50, lambda weights=None, norm_layer=None: tiny_resnet())


def randomised(module: nn.Module, seed: int = 0, folded_bn: bool = False) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith(("running_var", "bn1.weight")) else 0.0))
            if folded_bn and name.endswith("running_mean"):
                t.zero_()
            if folded_bn and name.endswith("running_var"):
                t.fill_(1.0 - 1e-5)
    return module


# ------------------------------------------------------------------ resolution
def test_imagenet_resolves_per_backbone():
    names = {b: pretrained.resolve_weights({"backbone": b, "pretrained": "imagenet"}).name
             for b in ("resnet50", "resnet101", "resnet101_dcn", "swin_b")}
    assert names == {"resnet50": "ResNet50_Weights.IMAGENET1K_V1", "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
                     "resnet101_dcn": "ResNet101_Weights.IMAGENET1K_V1", "swin_b": "Swin_B_Weights.IMAGENET1K_V1"}
    spec = pretrained.resolve_weights({"backbone": "resnet50", "pretrained": "imagenet"})
    assert spec.url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert spec.cache_path == Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    v2 = pretrained.resolve_weights({"backbone": "resnet50", "pretrained": "ResNet50_Weights.IMAGENET1K_V2"})
    assert v2.url.endswith("resnet50-11ad3fa6.pth")
    assert pretrained.resolve_weights({"backbone": "resnet_tiny", "pretrained": "none"}).kind == "none"


def test_null_tiny_imagenet_and_unknown_enum_are_input_errors():
    with pytest.raises(InputError, match="null.*'imagenet'.*'none'"):
        pretrained.resolve_weights({"backbone": "resnet50", "pretrained": None})
    with pytest.raises(InputError, match="resnet_tiny' has no ImageNet weights"):
        pretrained.resolve_weights({"backbone": "resnet_tiny", "pretrained": "imagenet"})
    with pytest.raises(InputError, match="unknown torchvision weights"):
        pretrained.resolve_weights({"backbone": "resnet50", "pretrained": "ResNet50_Weights.NOPE"})


def test_offline_and_not_cached_names_file_url_and_cache_path():
    with pytest.raises(InputError) as err:
        pretrained.prepare_weights({"backbone": "resnet101", "pretrained": "imagenet"})
    msg = str(err.value)
    cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in msg and str(cache) in msg
    assert "\n" not in msg


def test_download_goes_to_the_hub_cache_once(monkeypatch):
    calls = []

    def fake_download(url, dst):
        calls.append(url)
        torch.save({"w": torch.ones(1)}, dst)

    monkeypatch.setattr(pretrained, "_download", fake_download)
    cfg = {"backbone": "resnet50", "pretrained": "imagenet"}
    spec = pretrained.prepare_weights(cfg)
    assert spec.cache_path.is_file() and len(calls) == 1
    pretrained.prepare_weights(cfg)
    assert len(calls) == 1, "a cached file is not downloaded again"


def test_imagenet_load_checks_the_hash_and_loads(tiny_builders, monkeypatch):
    spec = pretrained.resolve_weights({"backbone": "resnet50", "pretrained": "imagenet"})
    source = randomised(tiny_resnet())
    spec.cache_path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), spec.cache_path)
    with pytest.raises(InputError, match="does not match the hash in its name"):
        backbone_mod.build_backbone({"backbone": "resnet50", "pretrained": "imagenet"})
    real = pretrained.file_sha256
    monkeypatch.setattr(pretrained, "file_sha256", lambda p: "0676ba61" + real(p)[8:])
    net = backbone_mod.build_backbone({"backbone": "resnet50", "pretrained": "imagenet", "freeze_at": 2})
    assert torch.equal(net.layer3[0].conv2.weight, source.layer3[0].conv2.weight)
    assert net.out_channels == {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}


def test_none_and_local_file(tiny_builders, tmp_path):
    a = backbone_mod.build_backbone({"backbone": "resnet50", "pretrained": "none"})
    src = randomised(tiny_resnet(), seed=3)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    b = backbone_mod.build_backbone({"backbone": "resnet50", "pretrained": str(path)})
    assert torch.equal(b.conv1.weight, src.conv1.weight) and not torch.equal(a.conv1.weight, src.conv1.weight)
    with pytest.raises(InputError, match="weights file does not exist"):
        pretrained.prepare_weights({"backbone": "resnet50", "pretrained": str(tmp_path / "absent.pth")})


def test_weights_record_names_file_and_sha256(tmp_path):
    from sim_core.engine.run_info import run_stamp

    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(2)}, path)
    rec = pretrained.weights_record({"backbone": "resnet50", "pretrained": str(path)})
    assert rec == {"name": str(path), "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    spec = pretrained.resolve_weights({"backbone": "swin_b", "pretrained": "imagenet"})
    spec.cache_path.parent.mkdir(parents=True)
    spec.cache_path.write_bytes(b"cached")
    params = {"train": {"method": "mask", "seed": 0}, "model": {"backbone": "swin_b", "pretrained": "imagenet"}}
    stamp = run_stamp(params, torch.device("cpu"))
    assert stamp["pretrained"]["name"] == "Swin_B_Weights.IMAGENET1K_V1"
    assert stamp["pretrained"]["sha256"] == hashlib.sha256(b"cached").hexdigest()
    assert pretrained.weights_record({"backbone": "resnet_tiny", "pretrained": "none"})["sha256"] is None


# ------------------------------------------------------------------ the early stop
def _paper_params(tmp_path: Path, name: str = "coco_r50_1x") -> Path:
    params = yaml.safe_load((REPO / "experiments" / "profiles" / f"{name}.yaml").read_text())
    params["data"]["root"] = str(tmp_path / "no_data_here")
    params["train"]["runs_dir"] = str(tmp_path / "runs")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_train_offline_stops_before_any_work(tmp_path, capsys):
    from sim_core.cli import main

    params = _paper_params(tmp_path)
    code = main(["train", "--run", "boxinst_s0", "--params", str(params)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "resnet50-0676ba61.pth" in err and "download.pytorch.org" in err
    assert not (tmp_path / "runs").exists()


def test_repro_offline_stops_before_dvc(tmp_path, capsys, monkeypatch):
    from experiments import repro
    from sim_core.cli import main

    params = _paper_params(tmp_path)
    monkeypatch.chdir(tmp_path)

    def no_dvc(*a, **k):
        raise AssertionError("dvc must not run when the weights are missing")

    monkeypatch.setattr(repro.subprocess, "call", no_dvc)
    monkeypatch.setattr(repro.subprocess, "run", no_dvc)
    monkeypatch.setattr(repro.subprocess, "Popen", no_dvc)
    code = main(["repro", "--params", str(params), "--jobs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "resnet50-0676ba61.pth" in err and "torch_home" in err


def test_null_in_a_params_file_stops_train(tmp_path, capsys):
    from sim_core.cli import main

    params = _paper_params(tmp_path)
    data = yaml.safe_load(params.read_text())
    data["model"]["pretrained"] = None
    params.write_text(yaml.safe_dump(data))
    assert main(["train", "--run", "mask_s0", "--params", str(params)]) == 2
    assert "write 'imagenet'" in capsys.readouterr().err


# ------------------------------------------------------------------ MSRA pickles
C2_NORM = {"weight": "s", "bias": "b"}


def to_c2(state: dict) -> dict:
    """A torchvision ResNet state dict in Caffe2/Detectron names, BN folded (what R-50.pkl holds)."""
    out = {}
    for key, t in state.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        arr = t.numpy().copy()
        if key.startswith("fc."):
            out[f"fc1000_{'w' if key.endswith('weight') else 'b'}"] = arr
            continue
        if key.startswith("conv1."):
            out["conv1_w"] = arr
            continue
        if key.startswith("bn1."):
            out[f"res_conv1_bn_{C2_NORM[key.split('.')[-1]]}"] = arr
            continue
        m = re.match(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(weight|bias)$", key)
        stage, block, kind, idx, what = int(m[1]) + 1, m[2], m[3], int(m[4]), m[5]
        prefix = f"res{stage}_{block}_"
        if kind == "conv":
            out[f"{prefix}branch2{'abc'[idx - 1]}_w"] = arr
        elif kind == "bn":
            out[f"{prefix}branch2{'abc'[idx - 1]}_bn_{C2_NORM[what]}"] = arr
        elif idx == 0:
            out[f"{prefix}branch1_w"] = arr
        else:
            out[f"{prefix}branch1_bn_{C2_NORM[what]}"] = arr
    out["res2_0_branch2a_w_momentum"] = np.zeros(1, dtype=np.float32)
    return out


def to_d2(state: dict) -> dict:
    """The same in detectron2 names, in detectron2's model-zoo container."""
    model = {}
    for key, t in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        k = re.sub(r"^conv1\.", "stem.conv1.", key)
        k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
        k = re.sub(r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.", k)
        k = re.sub(r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.", k)
        k = re.sub(r"^layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.", k)
        k = re.sub(r"^layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.", k)
        model[k] = t.numpy().copy()
    return {"model": model, "__author__": "torchvision", "matching_heuristics": True}


@pytest.mark.parametrize("layout,protocol", [("c2", 2), ("d2", 4)])
def test_msra_pickle_converts_to_torchvision_layout(tmp_path, layout, protocol):
    src = randomised(tiny_resnet(), seed=1, folded_bn=True)
    state = src.state_dict()
    path = tmp_path / "R-tiny.pkl"
    path.write_bytes(pickle.dumps(to_c2(state) if layout == "c2" else to_d2(state), protocol=protocol))
    converted = read_msra_state_dict(path)
    assert "fc.weight" not in converted and not any("momentum" in k for k in converted)
    dst = tiny_resnet()
    pretrained.load_pretrained(dst, path, "resnet-tiny", allowed_missing=("fc.*",))
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(dst.state_dict()[key], value), key


def test_msra_conventions_compute_what_detectron2_computes(tmp_path):
    """stride in the 1x1 conv and BGR/std-1 input, against a hand-built caffe-style reference."""
    src = randomised(tiny_resnet(), seed=2, folded_bn=True).eval()
    ref = randomised(tiny_resnet(), seed=2, folded_bn=True).eval()
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(ref, name)[0]
        block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
    apply_msra_conventions(src)
    assert src.layer2[0].conv1.stride == (2, 2) and src.layer2[0].conv2.stride == (1, 1)
    x_norm = torch.randn(1, 3, 64, 64)
    x_norm[..., -8:, :] = 0  # padding stays zero in both conventions
    x_msra = x_norm.flip(1) * torch.tensor(RGB_STD).flip(0).view(1, 3, 1, 1)  # BGR, mean removed, std 1
    body = lambda m, x: m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))  # noqa: E731
    with torch.no_grad():
        assert torch.allclose(body(src, x_norm), body(ref, x_msra), atol=1e-4, rtol=1e-4)


def test_msra_pickle_through_the_backbone_builder(tiny_builders, tmp_path):
    src = randomised(tiny_resnet(), seed=4, folded_bn=True)
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps(to_c2(src.state_dict()), protocol=2))
    net = backbone_mod.build_backbone({"backbone": "resnet50", "pretrained": str(path), "freeze_at": 2})
    assert net.layer3[0].conv1.stride == (2, 2) and net.layer3[0].conv2.stride == (1, 1)
    assert torch.allclose(net.conv1.weight[:, 0], src.conv1.weight[:, 2] * RGB_STD[0])
    assert torch.equal(net.layer4[0].conv3.weight, src.layer4[0].conv3.weight)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"model": {"conv1_w": _Evil(marker)}, "__author__": "x"}))
    with pytest.raises(InputError, match=r"refused global '(posix|nt|os)\.system'"):
        read_msra_state_dict(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"conv1_w": SimpleNamespace(a=1)}))
    with pytest.raises(InputError, match="refused global 'types.SimpleNamespace'"):
        pretrained.read_state_dict(path)
