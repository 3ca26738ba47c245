"""Privacy of mask summaries: what the server's estimates lose and what an attacker gains, versus
epsilon of the randomized-response mode.

    python -m simulations.privacy --out runs/privacy

Users as in the default federation (digits, 2-3 classes each) fine-prune with the device's default
settings; their masks go through the real summary path (build -> encode -> decode -> analysis) at
each epsilon. Measured against the exact (non-private) bitmaps: error of the per-connection prune
frequency, of the consensus sparsity and of the pairwise Jaccard matrix. The attack: the server
guesses which classes each user holds from its summary (the debiased share of each class's output
row that was pruned), with a threshold it learns on shadow users it makes itself from the vendor's
own labeled data (it has the base model and knows the algorithm). Writes privacy.csv, privacy.md,
privacy.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.cli import first_sentence
from common.data import partition as PT
from common.data import protocol as P
from common.data import readers as D
from common.engine.prune import fine_prune
from common.engine.scoring import usage_scores
from common.io import atomic_write_csv, atomic_write_png, atomic_write_text
from common.model.architectures import prunable_shapes
from common.model.checkpoint import fingerprint, load_checkpoint
from common.wire.federation import DEFAULTS, model_bytes
from common.wire.privacy import debias
from common.wire.summary import build_summary, decode, encode, usage_histograms
from server.analysis import analyze
from server.pretrain import pretrain
from simulations.bench_report import PREVIOUS_DEFAULT

EPSILONS = (None, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1)  # None: exact bitmaps, no privacy mode


def personalized_masks(base, ds: D.Dataset, idx: np.ndarray, n_users: int, seed: int, restrict: bool = True):
    """(mask, usage histograms, set of classes held) for users cut from ds[idx], each pruned with
    the device's default settings on its unlabeled data. `restrict`: with output restriction,
    which prunes the output rows of the classes a user lacks: the class-inference attack's worst
    case (the default leaves it off, and exact masks then carry no class rows)."""
    from common.wire.federation import prune_settings  # the device's own settings, as in the federation

    # with restriction: the engine the privacy numbers were measured with (the previous default:
    # the base's output layer ranked with the rest); a rebuilt head keeps the last layer whole but
    # for the restricted rows, which randomized response then cannot hide (docs/privacy/privacy.md)
    before = {k.replace("_", "-"): v for k, v in PREVIOUS_DEFAULT.items()}
    cfg = prune_settings(dict(DEFAULTS, **(before if restrict else {})))
    sub = ds.subset(idx)
    out = []
    for g in PT.partition_class_subsets(sub.y.numpy(), n_users, (DEFAULTS["classes-min"], DEFAULTS["classes-max"]),
                                       seed):
        g = torch.as_tensor(np.asarray(g))
        res = fine_prune(copy.deepcopy(base), sub.x[g], cfg)
        out.append((res.mask, usage_histograms(usage_scores(base, res.stats)), set(sub.y[g].tolist())))
    return out


def through_the_wire(users, base, epsilon, seed: int, level: str = "bitmap"):
    """Each user's summary as the server decodes it (private at `epsilon`, exact bitmap if None)."""
    fp, size = fingerprint(base), model_bytes(base)
    shapes = prunable_shapes(base)
    out, sizes = {}, []
    for i, (mask, hist, _) in enumerate(users):
        raw = encode(build_summary(mask, hist, level, fp, size, epsilon=epsilon, privacy_seed=seed * 10_000 + i))
        sizes.append(len(raw))
        out[f"u{i:03d}"] = decode(raw, fp, shapes, epsilon=epsilon)
    return out, float(np.mean(sizes)) / size


def class_row_pruned(summ, epsilon) -> np.ndarray:
    """The attacker's feature: (debiased) share of each class's output row that was pruned."""
    last = list(summ.bitmap.layers.values())[-1]
    bits = (~last).reshape(last.shape[0], -1).numpy()
    return (bits if epsilon is None else debias(bits, epsilon)).mean(1)


def learn_threshold(features: np.ndarray, present: np.ndarray) -> float:
    """Threshold t (a class is guessed present when its row feature < t) with the best accuracy."""
    cands = np.unique(np.concatenate([features, [features.min() - 1, features.max() + 1]]))
    mids = (cands[:-1] + cands[1:]) / 2
    acc = [((features < t) == present).mean() for t in mids]
    return float(mids[int(np.argmax(acc))])


def attack(target, shadow, epsilon, n_classes: int) -> dict:
    """Guess each target user's classes with a threshold learned on shadow users."""
    def table(summaries, users):
        f = np.stack([class_row_pruned(s, epsilon) for s in summaries.values()])
        truth = np.array([[c in held for c in range(n_classes)] for _, _, held in users])
        return f, truth

    fs, ts = table(*shadow)
    t = learn_threshold(fs.ravel(), ts.ravel())
    f, truth = table(*target)
    guess = f < t
    tp = (guess & truth).sum()
    prec = tp / max(guess.sum(), 1)
    rec = tp / max(truth.sum(), 1)
    return {"attack_accuracy": float((guess == truth).mean()),
            "attack_f1": float(2 * prec * rec / max(prec + rec, 1e-12)),
            "attack_exact_sets": float((guess == truth).all(1).mean()),
            "attack_chance_accuracy": float(max(truth.mean(), 1 - truth.mean()))}


def compare(exact: dict, est: dict, exact_analysis: dict, est_analysis: dict, epsilon) -> dict:
    """Errors of the server's estimates from (private) summaries against the exact bitmaps."""
    ids = sorted(exact)
    flat = lambda s: np.concatenate([(~m).flatten().numpy() for m in s.bitmap.layers.values()])
    truth, noisy = np.stack([flat(exact[i]) for i in ids]), np.stack([flat(est[i]) for i in ids])
    freq_est = (noisy if epsilon is None else debias(noisy, epsilon)).mean(0)
    off = ~np.eye(len(ids), dtype=bool)
    jac_err = np.abs(np.array(est_analysis["similarity"]) - np.array(exact_analysis["similarity"]))[off]
    sizes = np.array(list(est_analysis["layer_sizes"].values()))
    sparsity_est = [float(np.dot(est_analysis["layer_sparsity"][i], sizes) / sizes.sum()) for i in ids]
    cons_exact, cons_est = exact_analysis["consensus_sparsity"], est_analysis["consensus_sparsity"]
    return {"frequency_mae": float(np.abs(freq_est - truth.mean(0)).mean()),
            "sparsity_mae": float(np.mean(np.abs(np.array(sparsity_est) - truth.mean(1)))),
            "consensus_sparsity_exact": cons_exact, "consensus_sparsity_estimated": cons_est,
            "consensus_sparsity_error": abs(cons_est - cons_exact),
            "jaccard_mae": float(jac_err.mean()), "jaccard_max_error": float(jac_err.max())}


def run(out: Path, n_users: int = 30, n_shadow: int = 30, seed: int = 0, epsilons=EPSILONS, log=print,
        restrict: bool = True) -> list[dict]:
    t0 = time.perf_counter()
    ds = D.load_digits()
    ck = out / "digits_base.pt"
    pretrain("digits", ck, seed=seed, ds=ds)
    base, meta, _ = load_checkpoint(ck)
    vendor, pool = P.vendor_and_pool("digits", ds, seed)
    log(f"[{time.perf_counter() - t0:4.0f} s] fine-pruning {n_users} users and {n_shadow} shadow users")
    users = personalized_masks(base, ds, pool, n_users, seed, restrict)
    shadow = personalized_masks(base, ds, vendor, n_shadow, seed + 1, restrict)  # the server's own, from vendor data
    shapes = prunable_shapes(base)
    exact, _ = through_the_wire(users, base, None, seed)
    exact_analysis = analyze(exact, shapes, DEFAULTS["consensus-quorum"], DEFAULTS["cluster-threshold"])
    rows = []
    for eps in epsilons:
        est, upload = through_the_wire(users, base, eps, seed + 1)
        shadow_est, _ = through_the_wire(shadow, base, eps, seed + 2)
        est_analysis = analyze(est, shapes, DEFAULTS["consensus-quorum"], DEFAULTS["cluster-threshold"])
        row = {"epsilon": "none (exact)" if eps is None else eps, "users": n_users,
               "flip_probability": 0.0 if eps is None else 1 / (1 + np.exp(eps)), "upload_fraction": upload,
               **compare(exact, est, exact_analysis, est_analysis, eps),
               **attack((est, users), (shadow_est, shadow), eps, len(meta["classes"]))}
        rows.append(row)
        log(f"[{time.perf_counter() - t0:4.0f} s] epsilon {row['epsilon']}: Jaccard MAE {row['jaccard_mae']:.3f}, "
            f"attack accuracy {row['attack_accuracy']:.3f} (chance {row['attack_chance_accuracy']:.3f})")
    # the non-private alternative the server has for similarity: MinHash sketches
    sk, sk_upload = through_the_wire(users, base, None, seed, level="sketch")
    sk_sim = np.array(analyze(sk, shapes, DEFAULTS["consensus-quorum"], DEFAULTS["cluster-threshold"])["similarity"])
    err = np.abs(sk_sim - np.array(exact_analysis["similarity"]))[~np.eye(n_users, dtype=bool)]
    sketch = {"upload_fraction": sk_upload, "jaccard_mae": float(err.mean()), "jaccard_max_error": float(err.max())}
    log(f"sketch: upload {sk_upload:.4f} of the model, Jaccard MAE {err.mean():.3f} (max {err.max():.3f})")
    write(out, rows, sketch)
    return rows


def write(out: Path, rows: list[dict], sketch: dict) -> None:
    atomic_write_csv(out / "privacy.csv", rows)
    atomic_write_text(out / "privacy.json", json.dumps({"bitmaps": rows, "sketch": sketch}, indent=2, default=float))
    atomic_write_text(out / "privacy.md", to_markdown(rows) + (
        f"\nNon-private sketch summaries of the same users: upload {sketch['upload_fraction']:.4f} of the model, "
        f"pairwise Jaccard MAE {sketch['jaccard_mae']:.3f} (max {sketch['jaccard_max_error']:.3f}).\n"))
    plot(rows, out / "privacy.png")


def to_markdown(rows: list[dict]) -> str:
    lines = ["| epsilon (per bit) | bits flipped | upload / model | user sparsity MAE | prune-frequency MAE | "
             "consensus sparsity exact -> estimated | pairwise Jaccard MAE (max) | class attack accuracy (chance) | "
             "attack F1 | users' class sets guessed exactly |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['epsilon']} | {r['flip_probability']:.3f} | {r['upload_fraction']:.4f} | "
                     f"{r['sparsity_mae']:.4f} | {r['frequency_mae']:.4f} | {r['consensus_sparsity_exact']:.3f} -> "
                     f"{r['consensus_sparsity_estimated']:.3f} | {r['jaccard_mae']:.3f} ({r['jaccard_max_error']:.3f}) | "
                     f"{r['attack_accuracy']:.3f} ({r['attack_chance_accuracy']:.3f}) | {r['attack_f1']:.3f} | "
                     f"{r['attack_exact_sets']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    priv = [r for r in rows if not isinstance(r["epsilon"], str)]
    exact = next((r for r in rows if isinstance(r["epsilon"], str)), None)
    eps = [r["epsilon"] for r in priv]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("jaccard_mae", "pairwise Jaccard MAE"), ("consensus_sparsity_error", "consensus sparsity error"),
                       ("frequency_mae", "prune-frequency MAE")):
        a1.plot(eps, [r[key] for r in priv], "o-", label=label)
    a1.set_xscale("log")
    a1.set_xlabel("epsilon per mask bit (log)")
    a1.set_ylabel("absolute error vs exact bitmaps")
    a1.set_title("What the server's analysis loses")
    a1.legend(fontsize=8)
    a2.plot(eps, [r["attack_accuracy"] for r in priv], "o-", label="private summaries")
    if exact:
        a2.axhline(exact["attack_accuracy"], color="red", ls="--", label="exact bitmaps")
    a2.axhline(priv[0]["attack_chance_accuracy"] if priv else 0.5, color="grey", ls=":", label="chance (majority)")
    a2.set_xscale("log")
    a2.set_ylim(0.5, 1.02)
    a2.set_xlabel("epsilon per mask bit (log)")
    a2.set_ylabel("accuracy of guessing a user's classes")
    a2.set_title("What an attacker at the server gains")
    a2.legend(fontsize=8)
    atomic_write_png(path, fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("--out", default="runs/privacy")
    p.add_argument("--users", type=int, default=30)
    p.add_argument("--shadow-users", type=int, default=30)
    p.add_argument("--epsilons", default="none,8,4,2,1,0.5,0.25,0.1", help="comma-separated; 'none' = exact bitmaps")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    eps = tuple(None if e.strip() == "none" else float(e) for e in a.epsilons.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    run(out, a.users, a.shadow_users, a.seed, eps, log=lambda s: print(s, file=sys.stderr, flush=True))
    print((out / "privacy.md").read_text())


if __name__ == "__main__":
    main()
