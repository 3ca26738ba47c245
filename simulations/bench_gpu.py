"""Engine throughput on a large model: ResNet50 at 224x224 (the paper's ImageNet setting).

    fineprune bench-gpu --device cuda --images 1000 --out runs/bench_gpu

Measures images/s of statistics collection, the time to personalize N images (label-free stop
rule, BatchNorm recalibration, output restriction: what a device runs), one plain inference pass
and one epoch of backprop fine-tuning on the same images, and peak memory. Inputs are synthetic:
throughput does not depend on pixel values, and accuracy on ImageNet needs the user's own weights
(--weights) and images, which cannot be downloaded here.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from common.io import atomic_write_text
from common.models import build_model
from common.forward import resolve_device
from common.prune import PruneConfig, collect_stats, fine_prune, predict_logits
from common.train import train_supervised


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None
    return out, sec, peak


def run(arch: str = "resnet50", images: int = 1000, size: int = 224, device: str = "cpu", batch_size: int = 64,
        weights: str | None = None, num_classes: int = 1000, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=num_classes, weights_path=weights).eval()
    x = torch.rand(images, 3, size, size)
    y = torch.randint(0, num_classes, (images,))
    predict_logits(model.to(device), x[:batch_size], batch_size, device)  # warm-up (cuDNN autotune, caches)
    rows = {}
    _, sec, peak = _timed(lambda: predict_logits(model, x, batch_size, device), device)
    rows["inference pass"] = {"seconds": sec, "images_per_s": images / sec, "peak_gpu_mb": peak}
    log(f"inference pass: {sec:.2f} s ({images / sec:.0f} images/s)")
    _, sec, peak = _timed(lambda: collect_stats(model, x, batch_size, device), device)
    rows["statistics collection"] = {"seconds": sec, "images_per_s": images / sec, "peak_gpu_mb": peak}
    log(f"statistics collection: {sec:.2f} s ({images / sec:.0f} images/s)")
    # every setting a row depends on is spelled out: the rows do not move when a default does
    for name, kw in (("fine-prune, target 0.7", dict(target_sparsity=0.7, recalibrate_bn=False, restrict_outputs=False)),
                     ("fine-prune, label-free stop +bn+restrict", dict(recalibrate_bn=True, restrict_outputs=True))):
        m = copy.deepcopy(model)
        res, sec, peak = _timed(lambda: fine_prune(m, x, PruneConfig(batch_size=batch_size, **kw), device), device)
        rows[name] = {"seconds": sec, "images_per_s": images / sec, "peak_gpu_mb": peak, "sparsity": res.sparsity,
                      "forward_passes": res.forward_samples / images, "stop_reason": res.stop_reason}
        log(f"{name}: {sec:.2f} s, sparsity {res.sparsity:.3f}")
        del m
    m = copy.deepcopy(model)
    _, sec, peak = _timed(lambda: train_supervised(m, x, y, epochs=1, lr=1e-4, batch_size=32, device=device), device)
    rows["backprop, 1 epoch (labels)"] = {"seconds": sec, "images_per_s": images / sec, "peak_gpu_mb": peak}
    log(f"backprop 1 epoch: {sec:.2f} s")
    infer = rows["inference pass"]["seconds"]
    for r in rows.values():
        r["x_inference"] = r["seconds"] / infer
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"arch": arch, "images": images, "size": size, "device": device, "device_name": name,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "rows": rows}


def to_markdown(res: dict) -> str:
    lines = [f"{res['arch']}, {res['images']} images at {res['size']}x{res['size']}, {res['device_name']} "
             f"(batch {res['batch_size']})", "", "| step | seconds | images/s | x one inference pass | peak GPU MB |",
             "|---|---|---|---|---|"]
    for k, r in res["rows"].items():
        pk = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        lines.append(f"| {k} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | {r['x_inference']:.2f} | {pk} |")
    return "\n".join(lines) + "\n"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="fineprune bench-gpu", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", help="resnet50 (default) or resnet18")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", help="local weights file for the model (optional; timing does not need it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="runs/bench_gpu")
    return p


def main(args) -> dict:
    if args.arch not in ("resnet18", "resnet50"):
        raise ValueError(f"bench-gpu supports resnet18 and resnet50, not '{args.arch}'")
    if args.images < 1 or args.size < 32:
        raise ValueError("--images must be >= 1 and --size >= 32")
    res = run(args.arch, args.images, args.size, resolve_device(args.device), args.batch_size, args.weights,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(args.out)
    atomic_write_text(out / "bench_gpu.json", json.dumps(res, indent=2))
    atomic_write_text(out / "bench_gpu.md", to_markdown(res))
    print(to_markdown(res), file=sys.stderr)
    return {"results": str(out / "bench_gpu.md"), "device": res["device_name"]}


if __name__ == "__main__":
    main(build_parser().parse_args())
