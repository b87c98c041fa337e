"""ViTDet Mask R-CNN (``cmae.models.vitdet``): parameters, FLOPs and one training step; one JSON
line per measurement, optionally next to detectron2's own ViTDet in the same process.

    python benchmarks/bench_detect.py                 # ours: ViT-B params, FLOPs at 1024,
                                                      # training steps + MFU at 256 px
    python benchmarks/bench_detect.py --detectron2 /path/to/detectron2   # + detectron2's model

On a loaded 2-core CPU, 1 thread: ~100 s per model for the FLOP count at 1024 px (peak memory
~3 GB: the global blocks' 4096 x 4096 attention maps on the math backend), ~1 min per step at
256 px (512 RoIs per image); both models in one process hold ~3.7 GB.

FLOPs: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention) with every
``scaled_dot_product_attention`` on the math backend, whose matmuls the counter sees. Counted on
one random ``--flop-size`` image in eval mode: the backbone + simple feature pyramid (the
``backbone`` module's share) and the whole model's inference (RPN, box head on the proposals, mask
head on the detections). Parameters: every parameter of the model (COCO: 81 classes with the
background for torchvision, 80 for detectron2).

Training step: forward, backward and an SGD step on ``--batch`` random ``--step-size`` images
with ``--boxes`` rectangles each (boxes, classes, filled masks), ``--warmup`` steps then the
median of ``--steps``. With ``--detectron2`` the two models' steps alternate, so the machine's
load hits both alike. MFU = counted training FLOPs per step / step time / the fp32 2048^3
matmul rate measured in the same process (``bench_step.matmul_peak``).

``--detectron2 ROOT``: a detectron2 source checkout built in place (``python setup.py build_ext
--inplace``) and importable (PYTHONPATH=ROOT); its ``projects/ViTDet/configs/COCO/
mask_rcnn_vitdet_b_100ep.py`` is instantiated with LazyConfig, its ``img_size`` and
``square_pad`` set to the step size for the training step (as ours), left at 1024 for FLOPs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_step import cpu_seconds, matmul_peak  # this directory (sys.path[0] as a script)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cmae.models.vit import ViTEncoder
from cmae.models.vitdet import build_detector

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
D2_CONFIG = "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py"
COCO_CLASSES = 80


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


@contextmanager
def counted():
    """FlopCounterMode with the attention on the math backend (the fused CPU kernel counts 0)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def module_flops(counter: FlopCounterMode, name: str) -> int:
    return sum(counter.get_flop_counts().get(name, {}).values())


# ---------------------------------------------------------------------------------------------
# the two models behind one interface: build, one inference, one training loss


def synthetic_instances(batch: int, size: int, boxes: int, seed: int) -> list[dict]:
    """``boxes`` random rectangles per image: xyxy boxes, classes 0..79, filled masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.randint(0, size // 2, (boxes, 2), generator=g).float()
        wh = torch.randint(size // 8, size // 2, (boxes, 2), generator=g).float()
        xyxy = torch.cat([xy, xy + wh], 1).clamp(max=size)
        masks = torch.zeros(boxes, size, size, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(xyxy.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        classes = torch.randint(0, COCO_CLASSES, (boxes,), generator=g)
        image = torch.rand(3, size, size, generator=g)
        out.append({"image": image, "boxes": xyxy, "classes": classes, "masks": masks})
    return out


class Ours:
    name = "cmae"

    def __init__(self, size: int) -> None:
        torch.manual_seed(0)
        encoder = ViTEncoder(224, 16, 768, 12, 12)  # ViT-B/16 pretrained at 224 px
        encoder.init_weights()
        self.model = build_detector(
            encoder,
            num_classes=COCO_CLASSES + 1,
            img_size=size,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
        self.root = type(self.model).__name__

    def infer(self, image: torch.Tensor) -> None:
        self.model([image])

    def loss(self, batch: list[dict]) -> torch.Tensor:
        images = [b["image"] for b in batch]
        targets = [
            {"boxes": b["boxes"], "labels": b["classes"] + 1, "masks": b["masks"]} for b in batch
        ]
        return sum(self.model(images, targets).values())

    def context(self):
        return torch.enable_grad()


class Detectron2:
    name = "detectron2"

    def __init__(self, root: Path, size: int) -> None:
        from detectron2.config import LazyConfig, instantiate
        from detectron2.structures import BitMasks, Boxes, Instances
        from detectron2.utils.events import EventStorage

        self._structures = (BitMasks, Boxes, Instances)
        self._storage = EventStorage
        cfg = LazyConfig.load(str(root / D2_CONFIG))
        cfg.model.backbone.net.img_size = size  # the global blocks' relative position tables
        cfg.model.backbone.square_pad = size
        torch.manual_seed(0)
        self.model = instantiate(cfg.model)
        self.root = type(self.model).__name__

    def _inputs(self, batch: list[dict]) -> list[dict]:
        bit_masks, boxes, instances = self._structures
        out = []
        for b in batch:
            size = tuple(b["image"].shape[1:])
            inst = instances(size)
            inst.gt_boxes = boxes(b["boxes"])
            inst.gt_classes = b["classes"]
            inst.gt_masks = bit_masks(b["masks"].bool())
            # detectron2 takes 0-255 pixels (its pixel_mean / std are in that scale)
            out.append({"image": b["image"] * 255, "instances": inst})
        return out

    def infer(self, image: torch.Tensor) -> None:
        h, w = image.shape[1:]
        self.model([{"image": image * 255, "height": h, "width": w}])

    def loss(self, batch: list[dict]) -> torch.Tensor:
        return sum(self.model(self._inputs(batch)).values())

    def context(self):
        return self._storage()  # its heads log training statistics into an event storage


# ---------------------------------------------------------------------------------------------
# measurements


def params_and_flops(make: Callable[[], Ours | Detectron2], size: int) -> dict:
    net = make()
    model = net.model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.no_grad(), counted() as counter:
        net.infer(image)
    return {
        "model": net.name,
        "params": n_params,
        "params_backbone": sum(p.numel() for p in model.backbone.parameters()),
        "img_size": size,
        "backbone_gflop": round(module_flops(counter, f"{net.root}.backbone") / 1e9, 2),
        "inference_gflop": round(counter.get_total_flops() / 1e9, 2),
        "count_s": round(time.perf_counter() - t0, 1),
    }


def train_step(net: Ours | Detectron2, opt: torch.optim.Optimizer, batch: list[dict]) -> float:
    t0 = time.perf_counter()
    with net.context():
        net.loss(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # the other model's step runs without these gradients
    return time.perf_counter() - t0


def train_flops(net: Ours | Detectron2, batch: list[dict]) -> int:
    with net.context(), counted() as counter:
        net.loss(batch).backward()
    net.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--detectron2", type=Path, help="a built detectron2 checkout to compare with")
    p.add_argument("--flop-size", type=int, default=1024, help="image side for the FLOP count")
    p.add_argument("--step-size", type=int, default=256, help="image side for the step")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--boxes", type=int, default=4, help="instances per training image")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-flops", action="store_true", help="only the training steps")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    common = {
        "bench": "detect",
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }

    makers: list[Callable[[int], Ours | Detectron2]] = [Ours]
    if args.detectron2 is not None:
        root = args.detectron2.resolve()
        makers.append(lambda size: Detectron2(root, size))

    if not args.skip_flops:
        for make in makers:
            emit(
                **common,
                kind="flops",
                **params_and_flops(lambda m=make: m(args.flop_size), args.flop_size),
            )

    nets = [make(args.step_size) for make in makers]
    for net in nets:
        net.model.train()
    batch = synthetic_instances(args.batch, args.step_size, args.boxes, seed=2)
    flops = {net.name: train_flops(net, batch) for net in nets}
    # plain SGD: AdamW's state (2 x 0.9 GB for two ViT-B detectors) would not fit beside the
    # other work on a shared 24 GB machine; the update is < 1 % of a CPU step either way
    opts = {net.name: torch.optim.SGD(net.model.parameters(), lr=1e-4) for net in nets}
    peak = matmul_peak(torch.device("cpu"), None)
    times: dict[str, list[float]] = {net.name: [] for net in nets}
    machine0, own0 = cpu_seconds()
    t0 = time.perf_counter()
    for i in range(args.warmup + args.steps):
        for net in nets:  # alternating: the machine's load hits both alike
            t = train_step(net, opts[net.name], batch)
            if i >= args.warmup:
                times[net.name].append(t)
    machine1, own1 = cpu_seconds()
    wall = time.perf_counter() - t0
    for net in nets:
        step = statistics.median(times[net.name])
        emit(
            **common,
            kind="train_step",
            model=net.name,
            img_size=args.step_size,
            batch=args.batch,
            boxes=args.boxes,
            step_s=round(step, 3),
            step_s_all=[round(t, 3) for t in times[net.name]],
            gflop_per_step=round(flops[net.name] / 1e9, 2),
            achieved_gflops=round(flops[net.name] / step / 1e9, 2),
            peak_gflops=round(peak, 2),
            mfu=round(flops[net.name] / step / 1e9 / peak, 3),
            params=sum(p.numel() for p in net.model.parameters()),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            other_cpu=round(((machine1 - machine0) - (own1 - own0)) / wall, 2),
        )


if __name__ == "__main__":
    main()
