"""What one edge device does in a round: keep the base model and its personalized model on local
storage, fine-prune on its own unlabeled data, and build the mask summary it may upload."""
from __future__ import annotations

import secrets
from pathlib import Path

import torch

from client.personalize import Personalization, load_inputs, personalize
from common.io import atomic_write_bytes
from common.model.batches import resolve_device
from common.model.checkpoint import CheckpointError, fingerprint, load_checkpoint, save_checkpoint
from common.model.mask import Mask
from common.model.train import accuracy
from common.wire.federation import prune_settings
from common.wire.summary import SKETCH_FRAC, build_summary, encode


class Device:
    """`base_store`: where base models are kept. A real device keeps its one base in its own
    folder (base.pt). Simulated devices on one machine share one store, one file per base
    fingerprint, so 5,000 of them do not keep 5,000 copies of the same model."""

    def __init__(self, root: str | Path, base_store: str | Path | None = None):
        self.root = Path(root)
        self.base_store = None if base_store is None else Path(base_store)
        self.base_path = self.root / "base.pt"
        self.personal_path = self.root / "personal.pt"

    def _base_file(self, fp: str) -> Path:
        return self.base_path if self.base_store is None else self.base_store / f"base-{fp}.pt"

    # ------------------------------------------------------------ base model cache
    def store_base(self, model: torch.nn.Module, meta: dict) -> str:
        fp = fingerprint(model)
        path = self._base_file(fp)
        if self.base_store is None or not path.exists():  # a shared file of this fingerprint is this model
            save_checkpoint(path, model, meta)
        return fp

    def load_base(self, expected_fp: str):
        try:
            model, meta, _ = load_checkpoint(self._base_file(expected_fp))
        except CheckpointError as exc:
            raise RuntimeError(f"no usable base model on this device ({exc}); server must send it") from None
        fp = fingerprint(model)
        if fp != expected_fp:
            raise RuntimeError(f"stored base model {fp[:12]} is not the run's base {expected_fp[:12]}")
        return model, meta

    def has_base(self, expected_fp: str) -> bool:
        try:
            self.load_base(expected_fp)
            return True
        except RuntimeError:
            return False

    # ------------------------------------------------------------ personalization
    def personalize(self, base: torch.nn.Module, meta: dict, base_fp: str, x: torch.Tensor, cfg: dict,
                    progress=None, prior=None):
        """Returns (mask, Personalization) through the one device path (client/personalize.py),
        which resumes from the stored personalized model when it was made from this base, with
        these settings, on this data and this prior (a later round, or a restart). `prior`: the
        federation's, from a later round (common/engine/prior.py)."""
        return personalize(base, dict(meta, base_fingerprint=base_fp), x, prune_settings(cfg), self.personal_path,
                           resolve_device(cfg["device"]), progress=progress, prior=prior)

    def privacy(self, requested: float | None, max_epsilon: float | None) -> float | None:
        """The epsilon this device's summaries are randomized at. None (not private) only where the
        device sets no max-privacy-epsilon and has never been asked for privacy. A device with its
        own limit is private whatever the server asks (epsilon 0 gets the device's own) and never
        above its limit. The first epsilon used is kept on the device: a server that asks again
        with another epsilon gets the same noisy bits, not a second, independent report."""
        if max_epsilon is not None and requested is not None and requested > max_epsilon:
            raise PermissionError(f"the server asks for privacy epsilon {requested:g}; this device allows at most "
                                  f"{max_epsilon:g} (node config max-privacy-epsilon)")
        path = self.root / "privacy-epsilon"
        try:
            kept = float(path.read_text())
            if 0 < kept <= (max_epsilon if max_epsilon is not None else kept):
                return kept
        except (OSError, ValueError):
            pass
        eps = requested if requested is not None else max_epsilon
        if eps is not None:
            atomic_write_bytes(path, repr(float(eps)).encode(), private=True)
        return eps

    def privacy_key(self) -> bytes:
        """This device's secret for permanent randomized response (32 random bytes, kept private)."""
        path = self.root / "privacy-key"
        try:
            key = path.read_bytes()
            if len(key) == 32:
                return key
        except OSError:
            pass
        key = secrets.token_bytes(32)
        atomic_write_bytes(path, key, private=True)
        return key

    def upload(self, mask: Mask, info: Personalization, level: str, base_fp: str, model_size: int, seed: int,
               epsilon: float | None = None, sketch_frac: float = SKETCH_FRAC, classes: bool = False) -> bytes:
        """The summary this device uploads; `epsilon` from Device.privacy, `sketch_frac` the run's. A private one is
        randomized by permanent randomized response keyed by this device's secret: however the
        server varies its request (settings, a nudged base, rounds), the same mask gives the same
        noisy bits, so fresh noise cannot be collected and voted away. `classes`: the run asks for
        the class means (class-sums); a private device never sends them."""
        if epsilon is None:
            return summary_bytes(mask, info, level, base_fp, model_size, seed, sketch_frac=sketch_frac,
                                 classes=info.class_means() if classes else None)
        if level != "bitmap":
            raise PermissionError(f"this device sends only private bitmap summaries; the server asks for '{level}'")
        return encode(build_summary(mask, info.hist, level, base_fp, model_size, seed, epsilon=epsilon,
                                    privacy_key=self.privacy_key()))

    def personalized_model(self):
        model, meta, _ = load_checkpoint(self.personal_path)
        return model


def summary_bytes(mask: Mask, info: Personalization, level: str, base_fp: str, model_size: int, seed: int,
                  epsilon: float | None = None, sketch_frac: float = SKETCH_FRAC,
                  classes: tuple | None = None) -> bytes:
    """What the device uploads. With `epsilon`, the mask bits are randomized on the device first.
    `classes`: the class means and counts the summary carries (not with `epsilon`)."""
    return encode(build_summary(mask, info.hist, level, base_fp, model_size, seed, sketch_frac=sketch_frac,
                                epsilon=epsilon, classes=classes))


def research_accuracy(base, device: Device, heldout_x, heldout_y) -> dict:
    """Simulation only: labeled held-out accuracy before/after, never used by the pruning."""
    return {"accuracy_base": accuracy(base, heldout_x, heldout_y),
            "accuracy_personalized": accuracy(device.personalized_model(), heldout_x, heldout_y)}


def device_inputs(data_dir: str, features: dict) -> torch.Tensor:
    return load_inputs(data_dir, features)
