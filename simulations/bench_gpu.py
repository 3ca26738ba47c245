"""Engine cost on a large model: ResNet50 at 224x224 (the paper's ImageNet setting), on a GPU or
the CPU, with peak GPU memory: the columns of bench-cost (simulations/bench_cost.py) for one big
user.

    fineprune bench-gpu --device cuda --images 1000 --out runs/bench_gpu
    fineprune bench-gpu --device cuda --images 1000 --profile all-hooks,default --out runs/bench_gpu

--profile runs the named steps once more under torch.profiler and writes each one's operators by
self time (device time on a GPU) to profile-<step>.txt, and the top ones to bench_gpu.json.

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

from common.cli import first_sentence
from common.io import atomic_write_text
from common.model.batches import resolve_device
from simulations.bench_cost import COLUMNS, STEP_NAMES, load_workload, measure, parse_steps, profile


def run(arch: str = "resnet50", images: int = 1000, size: int = 224, device: str = "cpu", batch_size: int = 64,
        weights: str | None = None, repeats: int = 3, log=print, profile_steps: list[str] = ()) -> dict:
    model, x, y, desc = load_workload(arch, Path("."), 0, images, size=size, weights=weights)
    res = measure(model, x, y, device, repeats, batch_size, log=log)
    if profile_steps:
        log(f"  profiling: {', '.join(profile_steps)}")
        res["profile"] = profile(model, x, y, device, batch_size, list(profile_steps))
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
    for step, p in res.get("profile", {}).items():
        top = ", ".join(f"{o['op']} {o['self_device_ms'] if o['self_device_ms'] is not None else o['self_cpu_ms']:.1f} ms"
                        for o in p["ops"][:5])
        busy = (f", the GPU busy {p['device_busy_seconds']:.3f} s of it" if p["device_busy_seconds"] is not None
                else "")
        lines.append(f"Profiled {STEP_NAMES[step]} ({p['seconds']:.3f} s under the profiler{busy}; "
                     f"profile-{step}.txt), top operators by self time: {top}.")
    return "\n".join(lines) + "\n"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="fineprune bench-gpu", description=first_sentence(__doc__))
    p.add_argument("--arch", default="resnet50", help="resnet50 (default) or resnet18")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each step reports its median")
    p.add_argument("--weights", help="local weights file for the model (optional; timing does not need it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--profile", default="", metavar="STEPS",
                   help=f"comma-separated steps to run once more under torch.profiler ({', '.join(STEP_NAMES)}): "
                        "their operators by self time go to profile-<step>.txt")
    p.add_argument("--out", default="runs/bench_gpu")
    return p


def main(args) -> dict:
    if args.arch not in ("resnet18", "resnet50"):
        raise ValueError(f"bench-gpu supports resnet18 and resnet50, not '{args.arch}'")
    if args.images < 1 or args.size < 32 or args.repeats < 1 or args.batch_size < 1:
        raise ValueError("--images, --repeats and --batch-size must be >= 1 and --size >= 32")
    steps = parse_steps(args.profile)
    res = run(args.arch, args.images, args.size, resolve_device(args.device), args.batch_size, args.weights,
              args.repeats, log=lambda s: print(s, file=sys.stderr, flush=True), profile_steps=steps)
    out = Path(args.out)
    tables = {step: p.pop("table") for step, p in res.get("profile", {}).items()}
    for step, table in tables.items():
        atomic_write_text(out / f"profile-{step}.txt", table)
    atomic_write_text(out / "bench_gpu.json", json.dumps(res, indent=2))
    atomic_write_text(out / "bench_gpu.md", to_markdown(res))
    print(to_markdown(res), file=sys.stderr)
    return {"results": str(out / "bench_gpu.md"), "device": res["device_name"]}


if __name__ == "__main__":
    main(build_parser().parse_args())
