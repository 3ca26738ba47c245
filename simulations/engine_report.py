"""Measure the fine-pruning engine on real data (issue #2's numbers): per-user accuracy before and
after, sparsity, controls at matched sparsity, cost versus inference and backprop, compaction.

    python -m simulations.engine_report --fsdd ../shared/data/fsdd --out runs/engine
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import data as D
from common.compact import compact
from common.io import atomic_write_text
from common.prune import PruneConfig, fine_prune, personalized_model
from common.tasks import get_task
from common.train import accuracy, time_inference, train_supervised
from common.pretrain import pretrain

METHODS = {  # name -> PruneConfig kwargs; controls get the headline method's sparsity
    "usage": dict(scoring="usage"),
    "usage+bn+restrict": dict(scoring="usage", recalibrate_bn=True, restrict_outputs=True),
    "magnitude+bn+restrict": dict(scoring="magnitude", recalibrate_bn=True, restrict_outputs=True),
    "random+bn+restrict": dict(scoring="random", recalibrate_bn=True, restrict_outputs=True),
    "usage@0.7+bn+restrict": dict(scoring="usage", recalibrate_bn=True, restrict_outputs=True, target_sparsity=0.7),
    "magnitude@0.7+bn+restrict": dict(scoring="magnitude", recalibrate_bn=True, restrict_outputs=True,
                                      target_sparsity=0.7),
}
HEADLINE = "usage+bn+restrict"


def _size(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def evaluate_user(task, base, user: D.UserData, labels_unlabeled: torch.Tensor, base_cfg: dict) -> list[dict]:
    rows = []
    base_acc = accuracy(base, user.heldout_x, user.heldout_y)
    infer_s = time_inference(base, user.unlabeled)
    headline_sparsity = None
    for name, kw in METHODS.items():
        kw = dict(base_cfg, **kw)
        if name != "usage" and "target_sparsity" not in kw and name != HEADLINE:
            kw["target_sparsity"] = headline_sparsity  # controls: same sparsity as the headline method
        model = copy.deepcopy(base)
        res = fine_prune(model, user.unlabeled, PruneConfig(**kw))
        if name == HEADLINE:
            headline_sparsity = round(res.sparsity, 6)
        rows.append({"task": task, "user": user.user_id, "method": name, "n_unlabeled": len(user.unlabeled),
                     "n_heldout": len(user.heldout_y), "accuracy_base": base_acc,
                     "accuracy": accuracy(personalized_model(model, res), user.heldout_x, user.heldout_y),
                     "sparsity": res.sparsity, "stop_reason": res.stop_reason, "prune_seconds": res.seconds,
                     "inference_seconds": infer_s, "forward_samples": res.forward_samples})
    # the expensive baseline: 5 epochs of backprop with the labels we do not have on a device
    model = copy.deepcopy(base)
    cost = train_supervised(model, user.unlabeled, labels_unlabeled, epochs=5, lr=5e-4, batch_size=32)
    rows.append({"task": task, "user": user.user_id, "method": "backprop-5ep (labels)",
                 "n_unlabeled": len(user.unlabeled), "n_heldout": len(user.heldout_y), "accuracy_base": base_acc,
                 "accuracy": accuracy(model, user.heldout_x, user.heldout_y), "sparsity": 0.0,
                 "stop_reason": "", "prune_seconds": cost["seconds"], "inference_seconds": infer_s,
                 "forward_samples": cost["forward_samples"]})
    return rows


COMPACTION_METHODS = {  # unstructured usage pruning frees few whole units; structured firing frees many
    HEADLINE: METHODS[HEADLINE],
    "firing@0.3-per-layer+bn+restrict": dict(scoring="firing", scope="layer", recalibrate_bn=True,
                                             restrict_outputs=True, target_sparsity=0.3),
}


def compaction_rows(task, base, user, arch, arch_kwargs, cfg) -> list[dict]:
    return [compaction_row(task, base, user, arch, arch_kwargs, dict(cfg, **kw), name)
            for name, kw in COMPACTION_METHODS.items()]


def compaction_row(task, base, user: D.UserData, arch, arch_kwargs, cfg: dict, method: str) -> dict:
    """Latency (1 sample, 1 thread), batch time and size of the compacted model vs the base."""
    model = copy.deepcopy(base)
    res = fine_prune(model, user.unlabeled, PruneConfig(**cfg))
    small, _, kw = compact(model, res.mask, arch, arch_kwargs)
    one = user.unlabeled[:1]
    torch.set_num_threads(1)  # an edge CPU core; single-sample latency
    lat = {n: min(_latency(m, one) for _ in range(5)) for n, m in (("base", base), ("compact", small))}
    torch.set_num_threads(2)
    batch = {n: time_inference(m, user.unlabeled, repeats=5) for n, m in (("base", base), ("compact", small))}
    same = torch.equal(model(user.unlabeled[:64]).argmax(1), small(user.unlabeled[:64]).argmax(1))
    acc = accuracy(personalized_model(model, res), user.heldout_x, user.heldout_y)
    return {"task": task, "user": user.user_id, "method": method, "sparsity": res.sparsity, "accuracy": acc, "widths_base": arch_kwargs.get("widths"),
            "widths_compact": kw["widths"], "latency_ms_base": lat["base"] * 1e3,
            "latency_ms_compact": lat["compact"] * 1e3, "batch_s_base": batch["base"],
            "batch_s_compact": batch["compact"], "bytes_base": _size(base), "bytes_compact": _size(small),
            "same_predictions": same}


@torch.no_grad()
def _latency(model, x, n=50):
    model.eval()
    t0 = time.perf_counter()
    for _ in range(n):
        model(x)
    return (time.perf_counter() - t0) / n


def run_digits(out: Path, cfg: dict, seed: int = 0):
    from common.checkpoint import load_checkpoint

    ds = D.load_digits()
    pretrain("digits", out / "digits_base.pt", seed=seed, ds=ds)
    base, meta, _ = load_checkpoint(out / "digits_base.pt")
    _, pool = D.vendor_user_split(len(ds), meta["training"]["vendor_frac"], seed)
    sub = ds.subset(pool)
    groups = D.partition_class_subsets(sub.y.numpy(), 10, (2, 3), seed)
    users = D.make_users(sub, groups, 0.3, seed)
    rows = []
    for u, g in zip(users, groups):
        labels = _labels_of(sub, g, u)
        rows += evaluate_user("digits", base, u, labels, cfg)
    comp = compaction_rows("digits", base, users[0], meta["arch"], {**meta["arch_kwargs"], "widths": (16, 32, 64)}, cfg)
    return rows, comp


def _labels_of(ds: D.Dataset, idx, user: D.UserData) -> torch.Tensor:
    """Labels of a user's unlabeled inputs, for the backprop baseline only (matched by content)."""
    x = ds.x[torch.as_tensor(idx)]
    y = ds.y[torch.as_tensor(idx)]
    flat = x.reshape(len(x), -1)
    pos = {bytes(r.numpy().tobytes()): i for i, r in enumerate(flat)}
    return torch.stack([y[pos[bytes(r.numpy().tobytes())]] for r in user.unlabeled.reshape(len(user.unlabeled), -1)])


def run_fsdd(out: Path, fsdd: str, cfg: dict, seed: int = 0):
    from common.checkpoint import load_checkpoint

    ds = D.load_fsdd(fsdd)
    rows, comp = [], None
    for speaker in sorted(set(ds.groups.tolist())):
        ck = out / f"fsdd_base_without_{speaker}.pt"
        r = pretrain("fsdd", ck, seed=seed, exclude_speaker=speaker, ds=ds)
        print(f"  base without {speaker}: seen-speaker test accuracy {r['test_accuracy']:.3f}", flush=True)
        base, meta, _ = load_checkpoint(ck)
        ui = np.flatnonzero(ds.groups == speaker)
        pers, ev = ui[ds.takes[ui] >= 5], ui[ds.takes[ui] < 5]  # official split: takes 0-4 are test
        user = D.UserData(speaker, ds.x[pers], ds.x[ev], ds.y[ev])
        rows += evaluate_user("fsdd-loso", base, user, ds.y[pers], cfg)
        if comp is None:
            comp = compaction_rows("fsdd-loso", base, user, meta["arch"],
                                   {**meta["arch_kwargs"], "widths": (16, 32, 64, 64)}, cfg)
    return rows, comp


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for task in sorted({r["task"] for r in rows}):
        for m in dict.fromkeys(r["method"] for r in rows):
            rs = [r for r in rows if r["task"] == task and r["method"] == m]
            if not rs:
                continue
            out.append({"task": task, "method": m, "users": len(rs),
                        "accuracy_base": np.mean([r["accuracy_base"] for r in rs]),
                        "accuracy": np.mean([r["accuracy"] for r in rs]),
                        "sparsity": np.mean([r["sparsity"] for r in rs]),
                        "seconds": np.mean([r["prune_seconds"] for r in rs]),
                        "x_inference": np.mean([r["prune_seconds"] / r["inference_seconds"] for r in rs])})
    return out


def to_markdown(summary: list[dict], comps: list[dict]) -> str:
    lines = ["| task | method | users | base acc | acc | sparsity | seconds/user | x one inference pass |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['task']} | {s['method']} | {s['users']} | {s['accuracy_base']:.3f} | {s['accuracy']:.3f} "
                     f"| {s['sparsity']:.3f} | {s['seconds']:.3f} | {s['x_inference']:.2f} |")
    lines += ["", "| task | method | sparsity | acc | widths base -> compact | latency ms (1 sample, 1 thread) | "
              "batch s | bytes | same predictions |", "|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['task']} | {c['method']} | {c['sparsity']:.3f} | {c['accuracy']:.3f} | "
                     f"{c['widths_base']} -> {c['widths_compact']} | {c['latency_ms_base']:.3f} -> "
                     f"{c['latency_ms_compact']:.3f} | {c['batch_s_base']:.4f} -> {c['batch_s_compact']:.4f} | "
                     f"{c['bytes_base']} -> {c['bytes_compact']} | {c['same_predictions']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fsdd", help="FSDD directory (omit to run digits only)")
    p.add_argument("--out", default="runs/engine")
    p.add_argument("--tolerance", type=float, default=0.1)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    cfg = {"tolerance": a.tolerance}
    rows, comps = run_digits(out, cfg)
    if a.fsdd:
        r, c = run_fsdd(out, a.fsdd, cfg)
        rows += r
        comps += c
    summary = summarize(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "engine_rows.csv", buf.getvalue())
    atomic_write_text(out / "engine_report.json", json.dumps({"rows": rows, "summary": summary,
                                                             "compaction": comps}, indent=2, default=float))
    md = to_markdown(summary, comps)
    atomic_write_text(out / "engine_report.md", md)
    print(md)


if __name__ == "__main__":
    main()
