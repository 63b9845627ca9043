"""The original code's half of ``simbench upstream crosscheck``: one forward and backward of AdelaiDet's model.

Run by the interpreter that imports detectron2 (never imported by simbench itself)::

    python crosscheck_driver.py settings.json

``settings.json`` names the checkout (``root``), its config file and overrides (``config``, ``opts``), the
input file written by ``baselines/crosscheck.py`` (``input``: the weights in the checkout's names, the
batch, the training step) and where to write the result (``output``). The model is built as the
checkout's ``tools/train_net.py`` builds it, loads the weights (keys the checkout has and simbench has not
keep their initial values and are listed), runs one training forward on the batch with the mask head's
iteration counter set to the step, sums the losses, runs backward and saves the loss values and every
parameter's gradient.
"""
import json
import os
import sys

with open(sys.argv[1], encoding="utf-8") as f:
    settings = json.load(f)
threads = int(settings.get("threads") or 1)
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(threads)

import torch  # noqa: E402

torch.set_num_threads(threads)
sys.path.insert(0, settings["root"])

from adet.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402


def main() -> None:
    cfg = get_cfg()
    cfg.merge_from_file(settings["config"])
    cfg.merge_from_list(list(settings["opts"]) + ["MODEL.DEVICE", "cpu"])
    cfg.freeze()
    blob = torch.load(settings["input"], map_location="cpu")
    model = build_model(cfg)
    own = model.state_dict()
    state = {}
    for key, value in blob["state_dict"].items():
        if key in own:
            state[key] = value.reshape(own[key].shape).to(own[key].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = sorted(set(blob["state_dict"]) - set(own)) + list(unexpected)
    step = int(blob["iteration"])
    if hasattr(model.mask_head, "_iter"):  # AdelaiDet adds 1 before it reads it: step i sees i + 1
        model.mask_head._iter.fill_(step)
    batched = []
    for image, boxes, classes in zip(blob["images_bgr"], blob["boxes"], blob["classes"]):
        h, w = int(image.shape[1]), int(image.shape[2])
        inst = Instances((h, w), gt_boxes=Boxes(boxes.float()), gt_classes=classes.long())
        batched.append({"image": image, "height": h, "width": w, "instances": inst})
    model.train()
    losses = model(batched)
    total = sum(losses.values())
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    torch.save({"losses": {k: float(v.detach()) for k, v in losses.items()}, "grads": grads,
                "missing": list(missing), "unexpected": unexpected, "no_grad": no_grad,
                "torch": str(torch.__version__)}, settings["output"])
    print("crosscheck driver: losses " + ", ".join(f"{k}={float(v):.6f}" for k, v in losses.items()), flush=True)


if __name__ == "__main__":
    main()
