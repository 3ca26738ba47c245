"""ResNet18 at 224x224 on a real task: the vendor trains it on the digits pictures upscaled to
224x224 (three channels), users holding 2-3 classes personalize it, and each structured
personalization is compacted through the dependency graph. Reports held-out accuracy per method,
that the compact model predicts as its masked form, and batch-1 CPU latency (1 thread, PyTorch and
onnxruntime, base and compact interleaved). Training wants a GPU (--device cuda); without one,
--size 64 keeps it to minutes.

    python -m simulations.resnet_users --device cuda --out runs/resnet_users
"""
from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from common.cli import first_sentence
from simulations.bench_report import PREVIOUS_DEFAULT as BEFORE  # noqa: E402

METHODS = {  # name: engine settings (fixed targets: equal sparsity across users)
    "default": None,  # the engine's defaults as they are, at the label-free stop
    "default+second probe": dict(confirm="on"),  # its stop judged again on a second probe (S31)
    "previous default": BEFORE,
    "unstructured usage 0.5": dict(target_sparsity=0.5),
    "unstructured usage 0.5, no BN recalibration": dict(target_sparsity=0.5, recalibrate_bn=False),
    "firing 0.5, no BN recalibration": dict(scoring="firing", target_sparsity=0.5, recalibrate_bn=False),
    # half the units inside every block (one reader each), the residual stream untouched
    "block-internal firing 0.5, no recalibration, refit skipped": dict(
        scoring="firing", scope="layer", target_sparsity=0.5, recalibrate_bn=False, refit=True, skip_refit=True),
    "block-internal firing 0.5, no recalibration, refit": dict(
        scoring="firing", scope="layer", target_sparsity=0.5, recalibrate_bn=False, refit=True),
    "block-internal channel-usage 0.5, no recalibration, refit": dict(
        scoring="channel-usage", scope="layer", target_sparsity=0.5, recalibrate_bn=False, refit=True),
    "block-internal channel-usage 0.5, refit": dict(
        scoring="channel-usage", scope="layer", target_sparsity=0.5, refit=True),
}
STRUCTURED = ("firing", "channel-usage")


def _latency_ms(fns: dict, x: torch.Tensor, reps: int) -> dict:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(3):
                fn(x)
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--users", type=int, default=6)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--reps", type=int, default=30, help="latency repetitions per model")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="", help="method names to run, separated by ';' (default: all)")
    p.add_argument("--base", help="the base.pt an earlier run of this script wrote: its users again, no training")
    p.add_argument("--user-seed", type=int, default=0, help="the draw of users (0: the users of every run so far)")
    a = p.parse_args(argv)
    methods = {k: v for k, v in METHODS.items() if not a.methods or k in a.methods.split(";")}
    warnings.simplefilter("ignore")
    from client.export import _onnx_bytes, onnx_session
    from common.data.protocol import simulated_user, task_dataset, vendor_train_test
    from common.engine.prune import fine_prune, personalized_model
    from common.model.architectures import build_model
    from common.model.compact_graph import compact_graph
    from common.model.train import accuracy, train_supervised
    from common.settings import PruneConfig
    from common.wire.federation import merged_config

    torch.manual_seed(0)
    dev, size = a.device, a.size
    up = lambda x: F.interpolate(x, size=size, mode="bilinear").repeat(1, 3, 1, 1)  # noqa: E731
    ds = task_dataset("digits", "")
    tr, te = vendor_train_test("digits", ds, 0)
    from common.engine.adapt import vendor_record
    from common.model.checkpoint import load_checkpoint, save_checkpoint

    t0 = time.time()
    if a.base:  # a base this script trained before (its base.pt): the users again, no training
        base, vendor, _ = load_checkpoint(a.base)
        if "class_moments" not in vendor:  # a base from before the per-class moments: the record again
            vendor = dict(vendor, **vendor_record(base, up(ds.x[tr]), ds.y[tr]))
    else:
        base = build_model("resnet18", num_classes=10)
        train_supervised(base, up(ds.x[tr]), ds.y[tr], epochs=a.epochs, lr=1e-3, device=dev)
        base = base.eval()
        vendor = vendor_record(base, up(ds.x[tr]), ds.y[tr])  # what the vendor records for the device's checks
        Path(a.out).mkdir(parents=True, exist_ok=True)
        save_checkpoint(Path(a.out) / "base.pt", base.cpu(), {
            "arch": "resnet18", "arch_kwargs": {"num_classes": 10}, "task": "digits-rgb", "classes": ds.classes,
            **vendor, "features": {"kind": "image", "image_size": size, "channels": 3}})
    base = base.to(dev)
    out = {"size": size, "epochs": a.epochs, "train_seconds": round(time.time() - t0, 1),
           "vendor_test_accuracy": accuracy(base, up(ds.x[te]), ds.y[te], device=dev), "users": []}
    print(f"trained in {out['train_seconds']} s; vendor test accuracy {out['vendor_test_accuracy']:.3f}", flush=True)
    cfg = merged_config({}, {"seed": a.user_seed})
    feats = {"kind": "image", "image_size": size, "channels": 3}
    for pid in range(a.users):
        u = simulated_user(cfg, pid, 10)
        x, hx, hy = up(u.unlabeled), up(u.heldout_x), u.heldout_y
        row = {"user": pid, "classes": sorted(set(u.heldout_y.tolist())), "base": accuracy(base, hx, hy, device=dev)}
        compacts = {}
        for name, kw in methods.items():
            m = copy.deepcopy(base)
            if kw is None or name in ("previous default", "default+second probe"):
                r = fine_prune(m, x, PruneConfig(**(kw or {})), dev, base_meta=vendor)
                row[name] = accuracy(personalized_model(m, r), hx, hy, device=dev)
                row[name + ": sparsity"] = round(r.sparsity, 4)
                row[name + ": adaptation"] = r.adaptation
                continue
            kw = dict(kw)
            if kw.pop("skip_refit", False):  # the same mask without its refit: the ablation
                import common.engine.prune as engine

                real, engine.refit_consumers = engine.refit_consumers, lambda *a, **k: {"samples": 0}
                try:
                    r = fine_prune(m, x, PruneConfig(**{**BEFORE, "restrict_outputs": False, **kw}), dev)
                finally:
                    engine.refit_consumers = real
            else:
                r = fine_prune(m, x, PruneConfig(**{**BEFORE, "restrict_outputs": False, **kw}), dev)
            row[name] = accuracy(m, hx, hy, device=dev)
            row[name + ": sparsity"] = round(r.sparsity, 4)
            if kw.get("scoring") in STRUCTURED:
                small, _, _ = compact_graph(m, r.mask, feats)
                m = m.cpu().eval()
                with torch.no_grad():
                    same = bool(torch.equal(small(hx[:16]).argmax(1), m(hx[:16]).argmax(1)))
                    diff = float((small(hx[:16]) - m(hx[:16])).abs().max())
                row[name + ": compact = masked"] = {"same_predictions": same, "max_abs_diff": diff}
                compacts[name] = small
        if pid == 0:  # latency: the first user's compact models against the base, CPU, 1 thread
            torch.set_num_threads(1)
            cpu_base = copy.deepcopy(base).cpu().eval()
            x1 = hx[:1].cpu()
            models = {"base": cpu_base, **compacts}
            pt = _latency_ms({k: m for k, m in models.items()}, x1, a.reps)
            sessions = {k: onnx_session(_onnx_bytes(m, hx[:2].cpu())) for k, m in models.items()}
            ort = _latency_ms({k: (lambda xx, s=s: s.run(None, {s.get_inputs()[0].name: xx.numpy()}))
                               for k, s in sessions.items()}, x1, a.reps)
            out["latency_ms_batch1_1thread"] = {k: {"pytorch": round(pt[k], 2), "onnxruntime": round(ort[k], 2),
                                                    "speedup_pytorch": round(pt["base"] / pt[k], 2),
                                                    "speedup_onnxruntime": round(ort["base"] / ort[k], 2),
                                                    "params": sum(q.numel() for q in models[k].parameters())}
                                                for k in models}
            print(json.dumps(out["latency_ms_batch1_1thread"]), flush=True)
        out["users"].append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    keys = ["base", *methods]
    out["mean"] = {k: round(sum(r[k] for r in out["users"]) / len(out["users"]), 3) for k in keys}
    out["worst"] = {k: round(min(r[k] for r in out["users"]), 3) for k in keys}
    print("mean", out["mean"], "\nworst", out["worst"], flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "resnet_users.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
