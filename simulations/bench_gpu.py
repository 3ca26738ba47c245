"""Engine cost on a large model: ResNet50 at 224x224 (the paper's ImageNet setting), on a GPU or
the CPU, with peak GPU memory: the columns of bench-cost (simulations/bench_cost.py) for one big
user.

    fineprune bench-gpu --device cuda --images 1000 --out runs/bench_gpu

Images are the digits pictures upscaled to 224x224 (three channels) and the weights are random
unless --weights names a local file: throughput and memory do not depend on either, and ImageNet
weights cannot be downloaded here. Where the default's stop rule stops does depend on them (the
table says where it stopped and how many probes it took).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from common.forward import resolve_device
from common.io import atomic_write_text
from simulations.bench_cost import COLUMNS, load_workload, measure


def run(arch: str = "resnet50", images: int = 1000, size: int = 224, device: str = "cpu", batch_size: int = 64,
        weights: str | None = None, repeats: int = 3, log=print) -> dict:
    model, x, y, desc = load_workload(arch, Path("."), 0, images, size=size, weights=weights)
    res = measure(model, x, y, device, repeats, batch_size, log=log)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {"arch": arch, "images": images, "size": size, "device": device, "device_name": name,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "repeats": repeats,
            "description": desc, **res}


def to_markdown(res: dict) -> str:
    lines = [f"{res['arch']}, {res['images']} images at {res['size']}x{res['size']}, {res['device_name']} "
             f"(batch {res['batch_size']}, median of {res['repeats']} interleaved rounds)", "",
             "| step | seconds | images/s | x one inference pass | peak GPU MB |", "|---|---|---|---|---|"]
    for k in COLUMNS:
        sec = res["seconds"][k]
        pk = f"{res['peak_gpu_mb'][k]:.0f}" if res["peak_gpu_mb"] else "-"
        lines.append(f"| {k} | {sec:.3f} | {res['images'] / sec:.0f} | {res['x_inference'][k]:.2f} | {pk} |")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in res["default_phases_x"].items() if v >= 0.005)
    lines += ["", f"The default stopped at sparsity {res['default_sparsity']:.3f} after {res['default_probes']} "
              f"probes; its time in inference passes: {parts}.",
              f"5 epochs of backprop cost {5 * res['x_inference']['backprop, 1 epoch'] / res['x_inference']['default (label-free stop)']:.1f}x "
              f"the default."]
    return "\n".join(lines) + "\n"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="fineprune bench-gpu", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50", help="resnet50 (default) or resnet18")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each step reports its median")
    p.add_argument("--weights", help="local weights file for the model (optional; timing does not need it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="runs/bench_gpu")
    return p


def main(args) -> dict:
    if args.arch not in ("resnet18", "resnet50"):
        raise ValueError(f"bench-gpu supports resnet18 and resnet50, not '{args.arch}'")
    if args.images < 1 or args.size < 32 or args.repeats < 1 or args.batch_size < 1:
        raise ValueError("--images, --repeats and --batch-size must be >= 1 and --size >= 32")
    res = run(args.arch, args.images, args.size, resolve_device(args.device), args.batch_size, args.weights,
              args.repeats, log=lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(args.out)
    atomic_write_text(out / "bench_gpu.json", json.dumps(res, indent=2))
    atomic_write_text(out / "bench_gpu.md", to_markdown(res))
    print(to_markdown(res), file=sys.stderr)
    return {"results": str(out / "bench_gpu.md"), "device": res["device_name"]}


if __name__ == "__main__":
    main(build_parser().parse_args())
