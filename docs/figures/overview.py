"""Draws docs/figures/overview.png, the README's picture of fineprune: python docs/figures/overview.py"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402


def box(ax, x, y, w, h, text, colour):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=colour, ec="#333333", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, wrap=True)


def arrow(ax, a, b, text="", dy=0.0):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, lw=1.2, color="#333333"))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + dy, text, ha="center", va="center", fontsize=8,
                bbox=dict(fc="white", ec="none", pad=1))


fig, ax = plt.subplots(figsize=(10, 4.8))
ax.set_xlim(0, 9.4)
ax.set_ylim(0, 4.7)
ax.axis("off")
box(ax, 0.1, 1.45, 2.6, 1.4, "Flower server\n(ServerApp)\n\nanalysis: what users prune,\nhow similar they are,\nslim shared base", "#dbe9f6")
for i, y in enumerate((3.0, 1.6, 0.2)):
    box(ax, 4.3, y, 3.0, 1.0, f"edge device {i + 1} (ClientApp)\nforward passes over the user's\nown unlabeled data: adapt + prune", "#e6f4df")
    box(ax, 7.7, y + 0.15, 1.5, 0.7, "personalized,\nsparser model\n(kept here)", "#fff2cc")
    arrow(ax, (7.3, y + 0.5), (7.7, y + 0.5))
    arrow(ax, (2.7, 2.4), (4.3, y + 0.65), "base model" if i == 0 else "", dy=0.15)
    arrow(ax, (4.3, y + 0.35), (2.7, 1.9), "mask summary only\n(no weights, no data)" if i == 2 else "", dy=-0.1)
ax.text(0.1, 4.45, "fineprune: label-free, backprop-free personalization by pruning, over Flower", fontsize=11,
        weight="bold")
out = Path(__file__).with_name("overview.png")
fig.savefig(out, dpi=110, bbox_inches="tight")
print(out)
