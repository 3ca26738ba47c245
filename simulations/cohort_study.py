"""The frame of a study over the benchmark's cohorts: its command line (--fsdd, --out, --cohorts,
--arms), each chosen cohort's users (bases cached under OUT/bases) personalized by each arm (a
PruneConfig change), the per-cohort summary (mean, sparsity, worst user against its base), and its
outputs (csv, json, md and a bar plot of the mean held-out accuracy per arm and cohort)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
from pathlib import Path

import torch

from common.cli import first_sentence
from common.data import readers as D
from common.io import atomic_write_csv, atomic_write_png, atomic_write_text
from simulations.bench_tasks import COHORTS, cohort_users


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=first_sentence(doc))
    p.add_argument("--fsdd", help="FSDD directory (e.g. ../shared/data/fsdd), for the speech cohorts")
    p.add_argument("--out", required=True, help="output folder (bases cached under OUT/bases)")
    p.add_argument("--cohorts", default=",".join(COHORTS), help=f"comma-separated subset of: {', '.join(COHORTS)}")
    p.add_argument("--seed", type=int, default=0, help="the cohorts' seed (bases and users; 0: the bench's)")
    return p


def run(a: argparse.Namespace, run_cohort) -> list[dict]:
    """`run_cohort(name, users)`'s rows over every cohort --cohorts names (an unknown one: one line
    and exit), on one thread."""
    cohorts = [c.strip() for c in a.cohorts.split(",") if c.strip()]
    if bad := [c for c in cohorts if c not in COHORTS]:
        raise SystemExit(f"unknown cohort '{bad[0]}' (choose from: {', '.join(COHORTS)})")
    out, ds = prepared(a, cohorts)
    rows = []
    for c in cohorts:
        rows += run_cohort(c, cohort_users(c, out, a.seed, ds))
    return rows


def prepared(a: argparse.Namespace, cohorts: list[str]) -> tuple[Path, D.Dataset | None]:
    """What a study's run needs once its input is checked: one thread, the output folder made, and
    the FSDD dataset where a speech cohort is chosen (else None)."""
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, D.load_fsdd(a.fsdd) if a.fsdd and any(c.startswith("fsdd") for c in cohorts) else None


def add_arms(p: argparse.ArgumentParser, arms: dict) -> None:
    """--arms on the study's parser (all of its arms by default)."""
    p.add_argument("--arms", default=",".join(arms), help=f"comma-separated subset of: {', '.join(arms)}")


def chosen_arms(text: str, arms: dict) -> dict:
    """The arms --arms names, in the study's order; an unknown one: one line and exit."""
    names = [k.strip() for k in text.split(",") if k.strip()]
    if bad := [k for k in names if k not in arms]:
        raise SystemExit(f"unknown arm '{bad[0]}' (choose from: {', '.join(arms)})")
    return {k: arms[k] for k in names}


def run_arms(name: str, users, arms: dict, setup=None) -> list[dict]:
    """One row per user: the base's held-out accuracy and, per arm, the personalized model's, its
    sparsity and BatchNorm mode. `setup(change)`: a context manager that takes an arm's keys that
    are not PruneConfig fields out of `change` and applies them for the arm's run."""
    from common.engine.prune import fine_prune
    from common.model.train import accuracy
    from common.settings import PruneConfig

    rows = []
    for base, meta, u in users:
        row = {"cohort": name, "user": u.user_id, "n": len(u.x), "base": accuracy(base, u.heldout_x, u.heldout_y)}
        for arm, change in arms.items():
            model, change = copy.deepcopy(base), dict(change)
            with setup(change) if setup else contextlib.nullcontext():
                res = fine_prune(model, u.x, PruneConfig(**change), base_meta=meta)
            row[arm] = accuracy(model, u.heldout_x, u.heldout_y)
            row[f"{arm} sparsity"] = round(res.sparsity, 4)
            row[f"{arm} bn"] = res.adaptation.get("bn")
        rows.append(row)
        print(f"  {name} {u.user_id} (n={row['n']}): base {row['base']:.3f}, "
              + ", ".join(f"{a} {row[a]:.3f}@{row[a + ' sparsity']:.2f}" for a in arms), flush=True)
    return rows


def summarize(rows: list[dict], arms) -> list[dict]:
    """Per cohort: users, the base's mean, and per arm the mean accuracy, mean sparsity and the
    worst user's accuracy against its base."""
    out = []
    for c in dict.fromkeys(r["cohort"] for r in rows):
        sel = [r for r in rows if r["cohort"] == c]
        s = {"cohort": c, "users": len(sel), "base": statistics.mean(r["base"] for r in sel)}
        for a in arms:
            s[a] = statistics.mean(r[a] for r in sel)
            s[f"{a} sparsity"] = statistics.mean(r[f"{a} sparsity"] for r in sel)
            s[f"{a} worst"] = min(r[a] - r["base"] for r in sel)
        out.append(s)
    return out


def objective(s: dict, arm: str) -> float:
    """A cohort's score for an arm: its mean gain over the base, less every point its worst user
    falls more than 2 points below its base (the adapt study's objective)."""
    return s[arm] - s["base"] - max(0.0, -s[f"{arm} worst"] - 0.02)


def loco(table: list[dict], arms, floor: float | None = None) -> list[dict]:
    """Per held-out cohort: the arm the other cohorts score best (mean objective; ties: the
    sparser), among those whose mean sparsity over them is at least `floor` where one is given
    (all arms where none reaches it), and what it gives the held-out one."""
    out = []
    for held in table:
        rest = [s for s in table if s is not held]
        sparsity = {a: statistics.mean(s[f"{a} sparsity"] for s in rest) for a in arms}
        ok = [a for a in arms if floor is None or sparsity[a] >= floor] or list(arms)
        pick = max(ok, key=lambda a: (round(statistics.mean(objective(s, a) for s in rest), 6), sparsity[a]))
        out.append({"held out": held["cohort"], "chosen": pick, "acc": held[pick],
                    "sparsity": held[f"{pick} sparsity"], "worst": held[f"{pick} worst"]})
    return out


def loco_lines(intro: str, folds: list[dict]) -> list[str]:
    """The leave-one-cohort-out folds as markdown lines after `intro`."""
    rows = [f"| {f['held out']} | {f['chosen']} | {f['acc']:.3f} | {f['sparsity']:.2f} | {f['worst']:+.3f} |"
            for f in folds]
    return ["", intro, "", "| held out | chosen | acc | sparsity | worst user |", "|---|---|---|---|---|", *rows]


def arms_study(argv, prog: str, doc: str, arms: dict, stem: str, title: str, plot_title: str, loco_intro: str,
               floor: float | None = None) -> None:
    """A study of `arms` over the chosen cohorts, its command line (`prog`, `doc`) parsed from `argv`:
    every user personalized by each arm, the summary with the leave-one-cohort-out choice (`floor`:
    loco's), OUT/stem.csv/.json/.md and OUT/stem.png."""
    p = parser(prog, doc)
    add_arms(p, arms)
    a = p.parse_args(argv)
    chosen = chosen_arms(a.arms, arms)
    rows = run(a, lambda c, users: run_arms(c, users, chosen))
    table = summarize(rows, chosen)
    lines = arms_table(title, table, chosen)
    if len(table) > 1:
        lines += loco_lines(loco_intro, loco(table, chosen, floor))
    write(Path(a.out), stem, rows, table, "\n".join(lines) + "\n")
    bar_plot(table, ["base", *chosen], plot_title, Path(a.out) / f"{stem}.png", figsize=(9, 4), fontsize=7)


def arms_table(title: str, table: list[dict], arms) -> list[str]:
    """The summary as markdown lines: a row per cohort and, over several, the mean of cohorts;
    each cell mean (sparsity; worst user against its base)."""
    lines = [f"# {title}: mean held-out accuracy (sparsity; worst user vs its base)", "",
             "| cohort | users | base | " + " | ".join(arms) + " |", "|---|---|---|" + "---|" * len(arms)]
    for s in table:
        cells = [f"{s[a]:.3f} ({s[a + ' sparsity']:.2f}; {s[a + ' worst']:+.3f})" for a in arms]
        lines.append(f"| {s['cohort']} | {s['users']} | {s['base']:.3f} | " + " | ".join(cells) + " |")
    if len(table) > 1:
        cells = [f"{statistics.mean(s[a] for s in table):.3f} ({statistics.mean(s[a + ' sparsity'] for s in table):.2f}; "
                 f"{min(s[a + ' worst'] for s in table):+.3f})" for a in arms]
        lines.append(f"| mean of cohorts | | {statistics.mean(s['base'] for s in table):.3f} | " + " | ".join(cells) + " |")
    return lines


def bar_plot(table: list[dict], names: list, title: str, path: Path, figsize=(8, 4), fontsize: int = 8) -> None:
    """One bar per name (a key of each summary row) per cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    w = 0.8 / len(names)
    for i, a in enumerate(names):
        ax.bar([k + i * w for k in range(len(table))], [s[a] for s in table], w, label=a)
    ax.set_xticks([k + w * (len(names) - 1) / 2 for k in range(len(table))], [s["cohort"] for s in table])
    ax.set_ylabel("mean held-out accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=fontsize)
    ax.set_title(title)
    atomic_write_png(path, fig)


def write(out: Path, stem: str, rows: list[dict], table: list[dict], markdown: str) -> None:
    """OUT/stem.csv (a row per user), .json (rows and summary) and .md; the markdown printed too."""
    out = Path(out)
    atomic_write_csv(out / f"{stem}.csv", rows)
    atomic_write_text(out / f"{stem}.json", json.dumps({"rows": rows, "summary": table}, indent=2))
    atomic_write_text(out / f"{stem}.md", markdown)
    print(markdown)
