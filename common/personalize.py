"""The edge-device path: base checkpoint + the user's unlabeled inputs -> personalized checkpoint.
Shared by the command line and the Flower ClientApp."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common import data as D
from common.checkpoint import fingerprint, load_checkpoint, save_checkpoint
from common.compact import compact
from common.models import OutputRestricted
from common.prune import PruneConfig, fine_prune


def load_inputs(path: str | Path, features: dict) -> torch.Tensor:
    """A directory of WAV/image files, or a .npy/.pt array of model inputs."""
    path = Path(path)
    if path.is_file() and path.suffix in (".npy", ".pt"):
        try:
            arr = np.load(path) if path.suffix == ".npy" else torch.load(path, weights_only=True)
        except Exception as exc:
            raise D.DataError(f"unreadable input array {path}: {str(exc).splitlines()[0][:200]}") from None
        x = torch.as_tensor(np.asarray(arr), dtype=torch.float32)
    else:
        x = D.load_unlabeled_dir(path, **features)
    check_inputs(x, features, str(path))
    return x


def input_shape(features: dict) -> tuple:
    if features["kind"] == "audio":
        return (features["clip_samples"],)
    return (features["channels"], features["image_size"], features["image_size"])


def check_inputs(x: torch.Tensor, features: dict, where: str) -> None:
    want = input_shape(features)
    if len(x) == 0:
        raise D.DataError(f"no samples in {where}")
    if tuple(x.shape[1:]) != want:
        raise D.DataError(f"inputs in {where} have shape {tuple(x.shape[1:])}, the model expects {want}")
    if not torch.isfinite(x).all():
        raise D.DataError(f"inputs in {where} contain NaN or infinite values")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{name}' (choose from: auto, cpu, cuda)")
    return name


def personalize(base_path, x: torch.Tensor, cfg: PruneConfig, out_path, device: str = "cpu",
                do_compact: bool = False, progress=None) -> dict:
    """Fine-prune the base checkpoint on x and write the personalized checkpoint atomically."""
    model, meta, base_mask = load_checkpoint(base_path, device)
    if isinstance(model, OutputRestricted):
        raise ValueError(f"{base_path} is already output-restricted; personalize from a base model")
    check_inputs(x, meta["features"], "the personalization data")
    base_fp = meta.get("base_fingerprint") or fingerprint(model)
    result = fine_prune(model, x, cfg, device, progress)
    arch_kwargs = dict(meta["arch_kwargs"])
    mask = result.mask
    model = model.cpu()
    if do_compact:
        model, mask, arch_kwargs = compact(model, mask, meta["arch"], arch_kwargs)
        if result.restricted_classes is not None:  # drop the output rows of excluded classes
            model, mask, arch_kwargs = _drop_classes(model, mask, meta["arch"], arch_kwargs,
                                                     result.restricted_classes)
    new_meta = {k: meta[k] for k in ("arch", "task", "classes", "features")}
    new_meta.update(arch_kwargs=arch_kwargs, base_fingerprint=base_fp, compacted=do_compact,
                    personalization={**result.summary(), "config": vars(cfg)})
    save_checkpoint(out_path, model, new_meta, mask=mask, restricted=result.restricted_classes)
    report = {"out": str(out_path), "sparsity": result.sparsity, "stop_reason": result.stop_reason,
              "prune_seconds": result.seconds, "forward_samples": result.forward_samples,
              "restricted_classes": result.restricted_classes, "base_fingerprint": base_fp,
              "layer_sparsity": result.mask.layer_sparsity(), "file_bytes": os.path.getsize(out_path),
              "history": result.history}
    return report


@torch.no_grad()
def _drop_classes(model, mask, arch, arch_kwargs, classes):
    from common.models import build_model, prunable_layers
    from common.mask import Mask

    last = list(prunable_layers(model))[-1]
    state = model.state_dict()
    idx = torch.tensor(classes)
    state[f"{last}.weight"] = state[f"{last}.weight"][idx].clone()
    state[f"{last}.bias"] = state[f"{last}.bias"][idx].clone()
    kwargs = dict(arch_kwargs, num_classes=len(classes))
    small = build_model(arch, **kwargs)
    small.load_state_dict(state)
    layers = dict(mask.layers)
    layers[last] = layers[last][idx].clone()
    return small.eval(), Mask(layers), kwargs
