"""Can devices that share an acoustic condition help each other without labels? A study of the
federation's prior before it is built into the rounds: data-poor FSDD devices (20 clips each, one
speaker under one condition; a speaker appears on several devices, each with other clips) adapt
alone, or take BatchNorm statistics pooled over the devices of their condition (the pool weighs
each device by its samples, its own included, so a device with much data barely moves). Held-out
clips of the same speaker under the same condition score only. Rows for 2, 5 and 10 devices per
condition, on the clean-speech base of the fsdd-cond cohort (takes 25-49, never these conditions).

    python -m simulations.federation_prior_study --fsdd ../shared/data/fsdd --out runs/fed_prior

Arms: base; AdaBN, T3A, LAME and AdaBN+T3A alone; the default personalization alone (the device
path's engine, pruning included) and with the federation's prior of round 2 (default+prior: the
shares of all devices that pruned each connection, built as the server builds it); the pooled statistics (no head); the pooled statistics with T3A's
prototypes of the device's own features; the device's own statistics with T3A's prototypes pooled
over its condition (each device's pseudo-labelled feature sums, as it would upload them), alone and
blended half and half with the base's logits; and the ceiling, backprop with the device's labels
(5 epochs, as in the benchmark). The pool is an oracle of the condition here (the server would cluster devices from
their summaries): the study asks whether the prior can help at all before that is built.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import first_sentence
from common.data import protocol as P
from common.data import readers as D
from common.engine.bn import bn_layers, load_bn_stats, recalibrate_bn
from common.engine.forward import features_and_logits
from common.engine.heads import T3AHead
from common.engine.prior import Prior
from common.engine.prune import fine_prune
from common.io import atomic_write_csv, atomic_write_text
from common.model.batches import batched_forward
from common.model.checkpoint import load_checkpoint
from common.model.train import train_supervised
from common.settings import BY_NAME, PruneConfig
from simulations import baselines as BL
from simulations import cohorts as CO
from simulations.bench_tasks import _cached_pretrain

CONDITIONS = {  # one fixed setting per condition: every device of a condition hears the same channel
    "noise": {"name": "noise", "snr_db": 5.0, "color": "white"},
    "reverb": {"name": "reverb", "rt60": 0.5},
    "phone": {"name": "phone"},
    "speed": {"name": "speed", "factor": 0.85},
}
ARMS = ("base", "adabn-alone", "t3a-alone", "lame-alone", "adabn+t3a-alone", "default-alone", "default+prior",
        "pooled", "pooled+t3a", "pooled-prototypes", "pooled-prototypes+base", "backprop-labels")


def devices(ds, cond: str, k: int, clips: int, seed: int) -> list[dict]:
    """k devices under `cond`: device d is speaker (d + condition index) mod 6 with `clips` clips
    of takes 5-24 drawn for it, held-out takes 0-4, all under the condition (own noise draws).
    Device d is the same whatever k (nested draws): the first 2 devices of a condition at 5 or 10
    per condition are those at 2, so a device's gain can be compared across federation sizes."""
    speakers = sorted(set(ds.groups.tolist()))
    ci = list(CONDITIONS).index(cond)
    out = []
    for d in range(k):
        rng = np.random.default_rng(seed * 100_000 + ci * 1_000 + d)
        spk = speakers[(d + ci) % len(speakers)]
        pers, ev = P.speaker_user(ds, spk, (P.TEST_TAKES, P.VENDOR_TAKE))
        pick = rng.choice(pers, size=min(clips, len(pers)), replace=False)
        s = seed * 7919 + ci * 997 + d * 2
        out.append({"id": f"{cond}-{d}:{spk}", "speaker": spk, "slot": d,
                    "x": CO.apply_speech(ds.x[torch.as_tensor(pick)], CONDITIONS[cond], 8000, s),
                    "hx": CO.apply_speech(ds.x[torch.as_tensor(ev)], CONDITIONS[cond], 8000, s + 1),
                    "hy": ds.y[torch.as_tensor(ev)], "y": ds.y[torch.as_tensor(pick)]})
    return out


def own_stats(base, x) -> list:
    """A device's BatchNorm statistics recalibrated on its own data: what it would contribute."""
    m = copy.deepcopy(base)
    recalibrate_bn(m, x, 256)
    return [(b.running_mean.clone(), b.running_var.clone()) for b in bn_layers(m)]


def pooled(stats: list[list], counts: list[int]) -> list:
    """Per layer, the moments of the union of the devices' data: means weighted by samples, the
    variance by the law of total variance."""
    n = float(sum(counts))
    out = []
    for layer in zip(*stats):
        mean = sum(c * m for (m, _), c in zip(layer, counts)) / n
        second = sum(c * (v + m ** 2) for (m, v), c in zip(layer, counts)) / n
        out.append((mean, (second - mean ** 2).clamp_min(0)))
    return out


def accuracy(logits, y) -> float:
    return float((logits.argmax(1) == y).float().mean())


def with_stats(base, stats):
    m = copy.deepcopy(base)
    load_bn_stats(bn_layers(m), stats)
    return m.eval()


def t3a_predict(model, x, hx):
    feats, logits, last = features_and_logits(model, x, 256)
    head = T3AHead(last.weight, last.bias, feats, logits)
    f, _, _ = features_and_logits(model, hx, 256)
    return head(f)


def prototype_sums(model, x) -> torch.Tensor:
    """What a device would contribute to pooled prototypes: per class, the sum of its normalized
    penultimate features over the samples its own adapted model predicts as that class (d, C)."""
    feats, logits, _ = features_and_logits(model, x, 256)
    return F.normalize(feats.float(), dim=1).T @ F.one_hot(logits.argmax(1), logits.shape[1]).float()


def pooled_prototypes(last, sums: list) -> torch.Tensor:
    """T3A's classifier from the condition's devices together: per class, the normalized mean of
    the base's row (its warm-up support) and every device's supports predicted as that class."""
    return F.normalize(F.normalize(last.weight.detach().float(), dim=1).T + sum(sums), dim=0)


def run_condition(base, meta, devs: list[dict]) -> list[dict]:
    stats = [own_stats(base, d["x"]) for d in devs]
    pool = pooled(stats, [len(d["x"]) for d in devs])
    # prototypes pooled over the condition: each device's from its own recalibrated model
    protos = [prototype_sums(with_stats(base, st), d["x"]) for d, st in zip(devs, stats)]
    rows = []
    for d, st in zip(devs, stats):
        with torch.no_grad():
            acc = {"base": accuracy(batched_forward(base, d["hx"]), d["hy"]),
                   "adabn-alone": accuracy(batched_forward(with_stats(base, st), d["hx"]), d["hy"])}
            acc["adabn+t3a-alone"] = accuracy(t3a_predict(with_stats(base, st), d["x"], d["hx"]), d["hy"])
            acc["pooled"] = accuracy(batched_forward(with_stats(base, pool), d["hx"]), d["hy"])
            acc["pooled+t3a"] = accuracy(t3a_predict(with_stats(base, pool), d["x"], d["hx"]), d["hy"])
            hf, hl, last = features_and_logits(with_stats(base, st), d["hx"], 256)
            pl = hf.float() @ pooled_prototypes(last, protos)
            acc["pooled-prototypes"] = accuracy(pl, d["hy"])
            # half the base's logits, half the pooled prototypes', each scaled to unit spread
            acc["pooled-prototypes+base"] = accuracy(0.5 * hl / hl.std() + 0.5 * pl / pl.std(), d["hy"])
            acc["t3a-alone"] = accuracy(BL.t3a(base, d["x"]).predict(d["hx"]), d["hy"])
            acc["lame-alone"] = accuracy(BL.lame(base, d["x"]).predict(d["hx"]), d["hy"])
        ceiling = copy.deepcopy(base)  # the ceiling: backprop with the labels a device does not have
        train_supervised(ceiling, d["x"], d["y"], epochs=5, lr=5e-4, batch_size=32)
        ceiling.eval()
        with torch.no_grad():
            acc["backprop-labels"] = accuracy(batched_forward(ceiling, d["hx"]), d["hy"])
        model = copy.deepcopy(base)
        d["mask"] = fine_prune(model, d["x"], PruneConfig(), base_meta=meta).mask
        with torch.no_grad():
            acc["default-alone"] = accuracy(batched_forward(model, d["hx"]), d["hy"])
        rows.append({"device": d["id"], "samples": len(d["x"]), **acc})
    return rows


def with_prior(base, meta, devs: list[dict], rows: list[dict]) -> None:
    """Round 2 of the real federation: the server's prior (the share of the non-outlier devices of
    all conditions that pruned each connection: the server does not know the conditions) and each
    device's default personalization with it (the arm default+prior; the sparsity columns)."""
    from server.analysis import pruned_shares, robust_voters

    voters, outliers = robust_voters({d["id"]: d["mask"] for d in devs})
    prior = Prior(pruned_shares(voters), float(BY_NAME["prior-samples"].default), len(voters))
    for d, r in zip(devs, rows):
        r["sparsity-alone"] = d["mask"].sparsity()
        if d["id"] in outliers:  # no prior: round 1's personalization stays
            r["default+prior"], r["sparsity-prior"] = r["default-alone"], r["sparsity-alone"]
            continue
        model = copy.deepcopy(base)
        res = fine_prune(model, d["x"], PruneConfig(), base_meta=meta, prior=prior)
        with torch.no_grad():
            r["default+prior"] = accuracy(batched_forward(model, d["hx"]), d["hy"])
        r["sparsity-prior"] = res.sparsity


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m simulations.federation_prior_study",
                                description=first_sentence(__doc__))
    p.add_argument("--fsdd", required=True, help="FSDD directory (e.g. ../shared/data/fsdd)")
    p.add_argument("--out", required=True, help="output folder (the base is cached under OUT/bases)")
    p.add_argument("--per-condition", default="2,5,10", help="devices per condition, comma-separated")
    p.add_argument("--clips", type=int, default=20, help="clips per device (default 20)")
    p.add_argument("--seeds", type=int, default=2, help="draws of devices per setting (default 2)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    ds = D.load_fsdd(a.fsdd)
    ck = out / "bases" / "fsdd_seen_s0_e12.pt"
    _cached_pretrain(ck, "fsdd", ck, seed=0, ds=ds, epochs=12, indices=P.seen_speaker_split(ds))
    base, meta, _ = load_checkpoint(ck)
    base.eval()
    rows = []
    t0 = time.time()
    for seed in range(a.seeds):
        for k in (int(v) for v in a.per_condition.split(",")):
            devs, new = [], []
            for cond in CONDITIONS:
                devs += devices(ds, cond, k, a.clips, seed)
                new += [{"seed": seed, "per_condition": k, "condition": cond, **r}
                        for r in run_condition(base, meta, devs[-k:])]
                print(f"seed {seed}, {k} per condition, {cond}: done ({time.time() - t0:.0f} s)", flush=True)
            with_prior(base, meta, devs, new)
            rows += new
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "study.csv", rows)
    table = summarize(rows)
    atomic_write_text(out / "study.json", json.dumps({"rows": rows, "summary": table}, indent=2))
    atomic_write_text(out / "study.md", to_markdown(table, a))
    plot(table, out / "gain.png")
    print(to_markdown(table, a))


def summarize(rows: list[dict]) -> list[dict]:
    table = []
    for k in sorted({r["per_condition"] for r in rows}):
        sel = [r for r in rows if r["per_condition"] == k]
        row = {"per_condition": k, "devices": len(sel)}
        for arm in ARMS:
            row[arm] = statistics.mean(r[arm] for r in sel)
            row[f"{arm}_worst_vs_base"] = min(r[arm] - r["base"] for r in sel)
        row["gain_pooled_vs_default"] = row["pooled"] - row["default-alone"]
        row["gain_prior_vs_default"] = row["default+prior"] - row["default-alone"]
        row["sparsity_alone"] = statistics.mean(r["sparsity-alone"] for r in sel)
        row["sparsity_prior"] = statistics.mean(r["sparsity-prior"] for r in sel)
        row["gain_pooled_vs_adabn"] = row["pooled"] - row["adabn-alone"]
        table.append(row)
    return table


def to_markdown(table: list[dict], a) -> str:
    lines = [f"# Pooled BatchNorm statistics as the federation's prior ({a.clips} clips per device, "
             f"{a.seeds} draws)", "",
             "Mean held-out accuracy over devices (worst device against its base in brackets).", "",
             "| devices per condition | devices | " + " | ".join(ARMS) + " | pooled vs default alone | "
             "pooled vs AdaBN alone | prior vs default alone | sparsity alone -> with the prior |",
             "|---|---|" + "---|" * (len(ARMS) + 4)]
    for r in table:
        cells = [f"{r[arm]:.3f} ({r[f'{arm}_worst_vs_base']:+.2f})" if arm != "base" else f"{r[arm]:.3f}"
                 for arm in ARMS]
        lines.append(f"| {r['per_condition']} | {r['devices']} | " + " | ".join(cells) +
                     f" | {r['gain_pooled_vs_default']:+.3f} | {r['gain_pooled_vs_adabn']:+.3f} | "
                     f"{r['gain_prior_vs_default']:+.3f} | {r['sparsity_alone']:.2f} -> {r['sparsity_prior']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_write_png

    ks = [r["per_condition"] for r in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        ax.plot(ks, [r[arm] for r in table], marker="o", label=arm)
    ax.set_xlabel("devices sharing a condition")
    ax.set_ylabel("mean held-out accuracy")
    ax.set_xticks(ks)
    ax.legend(fontsize=8)
    ax.set_title("Data-poor speech devices: alone vs pooled statistics")
    atomic_write_png(path, fig)


if __name__ == "__main__":
    main()
