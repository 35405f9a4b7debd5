"""The BYOL training step of `byol bench train`, in PyTorch, for a side-by-side comparison.

Same model (ResNet-18 as torchvision's, with the CIFAR stem, projector Linear-BN-ReLU-Linear, predictor
Linear-ReLU-Linear as the `seed` preset), same step (online forward and backward on both views,
target forward on both, Adam, EMA), random images. Prints one JSON line like `byol bench train`.
With --infer: the backbone's forward in eval mode without gradients, as `byol bench infer`.
With --device cuda: on the GPU, timed to the end of its work, with the GPU's peak memory;
--amp there is PyTorch's automatic mixed precision (fp16 autocast with a gradient scaler),
--bf16 the bf16 autocast.

    pip install torch
    python bench/pytorch_byol.py --width 1.0 --batch-size 128 --steps 10
    python bench/pytorch_byol.py --device cuda --batch-size 512 --amp
"""

import argparse
import copy
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def mlp(dim, hidden, out, batch_norm):
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.BatchNorm1d(hidden) if batch_norm else nn.Identity(),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (written out so that only `torch` is needed)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity, inplace=True)


def backbone(width):
    """ResNet-18 with the CIFAR stem (3x3 conv1, stride 1, no max-pool), fc removed; every
    stage's channels scaled by `width` as byol's --width."""
    base = max(1, round(64 * width))
    layers = [nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True)]
    cin = base
    for i, stride in enumerate([1, 2, 2, 2]):
        cout = base * 2**i
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


def loss_fn(p, z):
    return 2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--infer", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast and a gradient scaler")
    args = parser.parse_args()
    if args.amp and args.bf16:
        parser.error("--amp (fp16) and --bf16 exclude each other")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    low = torch.float16 if args.amp else torch.bfloat16
    mixed = args.amp or args.bf16
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net, dim = backbone(args.width)
    online = nn.Sequential(net, mlp(dim, 2048, 256, True))
    predictor = mlp(256, 2048, 256, False)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    online = online.to(device, memory_format=fmt)
    target = target.to(device, memory_format=fmt)
    predictor = predictor.to(device)
    opt = torch.optim.Adam(list(online.parameters()) + list(predictor.parameters()), lr=3e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)

    b, s = args.batch_size, args.image_size

    # Made once, as `byol bench` does: the step is what is measured.
    v1 = torch.randn(b, 3, s, s).to(device, memory_format=fmt)
    v2 = torch.randn(b, 3, s, s).to(device, memory_format=fmt)

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, dtype=low, enabled=mixed):
            net(v1)

    def step():
        with torch.autocast(device.type, dtype=low, enabled=mixed):
            p1, p2 = predictor(online(v1)), predictor(online(v2))
            with torch.no_grad():
                z1, z2 = target(v1), target(v2)
            loss = (loss_fn(p1.float(), z2.float()) + loss_fn(p2.float(), z1.float())).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(0.99).add_(po, alpha=0.01)

    if args.infer:
        net.eval()
        step = infer
    # CUDA runs asynchronously: a step is timed to the end of its GPU work.
    done = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    done()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        done()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    stack = "pytorch" + (" cuda" if cuda else "") + (" channels_last" if args.channels_last else "")
    stack += " amp fp16" if args.amp else " bf16" if args.bf16 else ""
    report = {
        "bench": "infer" if args.infer else "train", "stack": stack,
        "batch_size": b, "image_size": s, "images_per_sec": b / median,
        "timing": {"median_s": median, "min_s": min(times), "max_s": max(times), "steps": len(times)},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads(),
    }
    if cuda:
        report["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
        report["device"] = torch.cuda.get_device_name()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
