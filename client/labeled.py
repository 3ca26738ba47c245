"""A model checked on a few labeled examples, and files classified one by one: what an engineer at
the device does before and after personalizing (`fineprune evaluate`, `fineprune predict`).

Labels come from where people already keep them: FSDD-style WAV names `{label}_{speaker}_{take}.wav`
(the label is everything before the first underscore), or one subfolder per class for images
(ImageFolder). The class names must be the model's own (`fineprune info` lists them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.data import readers as D
from common.model.batches import BATCH_SIZE, batched_forward


def load_file(path: Path, features: dict) -> torch.Tensor:
    """One input as the model takes it (a WAV resampled and windowed, an image scaled)."""
    if features["kind"] == "audio":
        return D.read_wav(path, features["sample_rate"], features["clip_samples"])
    return D.load_image(path, features["image_size"], features["channels"])


def labeled_files(root: str | Path, features: dict, classes: list[str]) -> tuple[list[Path], list[int]]:
    root = Path(root)
    if not root.is_dir():
        raise D.DataError(f"data directory not found: {root}")
    index = {c: i for i, c in enumerate(classes)}
    files, labels, unknown = [], [], set()
    if features["kind"] == "audio":
        for p in sorted(q for q in root.rglob("*.wav") if q.is_file()):
            label = p.name.split("_", 1)[0] if "_" in p.name else None
            if label in index:
                files.append(p)
                labels.append(index[label])
            elif label is not None:
                unknown.add(label)
        how = "name WAV files {label}_{anything}.wav"
    else:
        for sub in sorted(d for d in root.iterdir() if d.is_dir()):
            imgs = sorted(q for q in sub.rglob("*") if q.suffix.lower() in D.IMAGE_SUFFIXES and q.is_file())
            if sub.name in index:
                files += imgs
                labels += [index[sub.name]] * len(imgs)
            elif imgs:
                unknown.add(sub.name)
        how = "put the images in one subfolder per class"
    if not files:
        extra = f" (found labels {sorted(unknown)[:5]} that are not the model's)" if unknown else ""
        raise D.DataError(f"no labeled data in {root}{extra}: {how}, with the model's classes "
                          f"{', '.join(classes[:12])}{'...' if len(classes) > 12 else ''}")
    return files, labels


def predict_proba(model: torch.nn.Module, x: torch.Tensor, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    return torch.softmax(batched_forward(model, x, batch_size), dim=1)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    pred = predict_proba(model, x).argmax(1)
    n = len(classes)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y.numpy(), pred.numpy()), 1)
    per_class = {classes[c]: {"n": int(cm[c].sum()), "accuracy": round(float(cm[c, c] / cm[c].sum()), 4)}
                 for c in range(n) if cm[c].sum()}
    return {"n": int(len(y)), "accuracy": round(float((pred == y).float().mean()), 4), "per_class": per_class,
            "confusion": {"classes": classes, "rows_true_cols_predicted": cm.tolist()}}


def plot_confusion(results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_write_png

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        cm = np.array(r["confusion"]["rows_true_cols_predicted"])
        present = [i for i in range(len(cm)) if cm[i].sum() or cm[:, i].sum()]
        cm = cm[np.ix_(present, present)]
        labels = [r["confusion"]["classes"][i] for i in present]
        ax.imshow(cm, cmap="Blues")
        for i in range(len(cm)):
            for j in range(len(cm)):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: accuracy {r['accuracy']:.3f} (n={r['n']})")
    fig.tight_layout()
    atomic_write_png(path, fig)
