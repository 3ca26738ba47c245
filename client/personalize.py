"""The edge-device path, one for the command line and the ClientApp: a base model and the user's
unlabeled inputs -> the personalized checkpoint, resumed when the same base, settings and data
were personalized before, with the usage histograms its summary needs (computed from the
statistics pass pruning already made, never a second pass)."""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.data import readers as D
from common.data.tasks import input_shape
from common.engine.prior import Prior
from common.engine.prune import check_config, fine_prune
from common.engine.scoring import usage_scores
from common.model.checkpoint import CheckpointError, fingerprint, load_checkpoint, model_meta, save_checkpoint
from common.model.compact import compact
from common.model.mask import Mask
from common.model.restricted import OutputRestricted, drop_classes
from common.settings import PruneConfig
from common.wire.summary import means_from_text, means_text, usage_histograms


@dataclass
class Personalization:
    """What a personalized checkpoint records about how it was made (its metadata, typed)."""
    key: str                      # base + settings + data: same key -> resume instead of redo
    base_fingerprint: str
    settings: dict                # the engine's settings by name
    sparsity: float
    stop_reason: str
    prune_seconds: float
    forward_samples: int
    restricted_classes: list | None
    compacted: bool
    hist: dict = field(default_factory=dict)   # usage histograms for the summary
    history: list = field(default_factory=list)
    adaptation: dict = field(default_factory=dict)  # BatchNorm mode, head, what the checks saw
    classes: dict = field(default_factory=dict)  # the class means and counts a summary may carry
    resumed: bool = False

    def class_means(self) -> tuple | None:
        """(means, counts) as tensors, or None for a checkpoint made before they were kept."""
        if not self.classes:
            return None
        c = self.classes
        return means_from_text(c["means"], c["shape"]), torch.tensor(c["counts"])

    @classmethod
    def from_meta(cls, meta: dict) -> "Personalization | None":
        d = meta.get("personalization")
        if not isinstance(d, dict):
            return None
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError:
            return None  # an older or foreign checkpoint: personalize again


def data_fingerprint(x: torch.Tensor) -> str:
    """Identifies the user's inputs: a device whose data changed personalizes again."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(np.ascontiguousarray(x.detach().cpu().float().numpy()))  # hashed in place: no copy of the data
    return h.hexdigest()[:16]


def prior_fingerprint(prior: Prior) -> str:
    """Identifies the federation's prior a personalization was made with, and its weight."""
    h = hashlib.sha256(repr(float(prior.samples)).encode())
    if prior.classes is not None:
        for t in (prior.classes.means, prior.classes.freq):
            h.update(np.ascontiguousarray(t.detach().cpu().float().numpy()))
    for k in sorted(prior.pruned or {}):
        h.update(k.encode())
        h.update(np.ascontiguousarray(prior.pruned[k].detach().cpu().float().numpy()))
    return h.hexdigest()[:16]


def personalization_key(cfg: PruneConfig, base_fp: str, data_fp: str, compacted: bool,
                        prior_fp: str | None = None) -> str:
    parts = [base_fp, data_fp, cfg.settings(), compacted] + ([prior_fp] if prior_fp else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def personalize(base: torch.nn.Module, meta: dict, x: torch.Tensor, cfg: PruneConfig, out_path,
                device: str = "cpu", do_compact: bool = False, progress=None,
                prior: Prior | None = None) -> tuple[Mask, Personalization]:
    """Fine-prune a copy of `base` on x and write the personalized checkpoint to out_path
    atomically; when out_path already holds this personalization, return it instead. `prior`:
    the federation's (common/engine/prior.py), from a later round."""
    if isinstance(base, OutputRestricted):
        raise ValueError("the base model is already output-restricted; personalize from a base model")
    check_inputs(x, meta["features"], "the personalization data")
    check_config(cfg)
    base_fp = meta.get("base_fingerprint") or fingerprint(base)
    key = personalization_key(cfg, base_fp, data_fingerprint(x), do_compact,
                              None if prior is None else prior_fingerprint(prior))
    stored = _resume(Path(out_path), key)
    if stored is not None:
        return stored
    model = copy.deepcopy(base)
    res = fine_prune(model, x, cfg, device, progress, base_meta=meta, prior=prior)
    model, mask, arch_kwargs = model.cpu(), res.mask, dict(meta["arch_kwargs"])
    history = None
    if do_compact and not hasattr(model, "prunable_chain"):  # residual graphs: Torch-Pruning's dependency graph
        from common.model.compact_graph import compact_graph

        model, mask, history = compact_graph(model, mask, meta["features"])
    elif do_compact:
        model, mask, arch_kwargs = compact(model, mask, meta["arch"], arch_kwargs)
        if res.restricted_classes is not None:  # drop the output rows of excluded classes
            model, mask, arch_kwargs = drop_classes(model, mask, meta["arch"], arch_kwargs, res.restricted_classes)
    info = Personalization(key, base_fp, cfg.settings(), res.sparsity, res.stop_reason, res.seconds,
                           res.forward_samples, res.restricted_classes, do_compact,
                           usage_histograms(usage_scores(base, res.stats)), res.history, adaptation=res.adaptation,
                           classes=_classes_record(res.class_means))
    new_meta = dict(model_meta(meta), arch_kwargs=arch_kwargs, base_fingerprint=base_fp, compacted=do_compact,
                    personalization=asdict(info), **({"pruning_history": history} if history else {}))
    # 0600: a personalized model records which classes this user has
    save_checkpoint(out_path, model, new_meta, mask=mask, restricted=res.restricted_classes, private=True)
    return res.mask, info


def _classes_record(class_means: tuple | None) -> dict:
    """The class means and counts as the checkpoint's metadata keeps them: the means as base64
    float16, what the summary sends (2 bytes a number, not a JSON decimal's ~20), the counts whole."""
    if class_means is None:
        return {}
    means, counts = class_means
    return {"means": means_text(means), "shape": list(means.shape),
            "counts": [int(c) for c in counts.round().tolist()]}


def _resume(path: Path, key: str):
    if not path.exists():
        return None
    try:
        _, meta, mask = load_checkpoint(path)
    except CheckpointError:
        return None  # unreadable: personalize again (the atomic write keeps the old one otherwise)
    info = Personalization.from_meta(meta)
    if info is None or info.key != key or mask is None:
        return None
    info.resumed = True
    return mask, info


# ---------------------------------------------------------------- the user's inputs
def load_inputs(path: str | Path, features: dict) -> torch.Tensor:
    """A directory of WAV/image files, or a .npy/.pt array of model inputs."""
    path = Path(path)
    if path.is_file() and path.suffix in (".npy", ".pt"):
        try:
            with warnings.catch_warnings():  # torch warns about a sparse tensor's invariants as it loads one
                warnings.simplefilter("ignore")
                arr = np.load(path) if path.suffix == ".npy" else torch.load(path, weights_only=True)
        except Exception as exc:
            raise D.DataError(f"unreadable input array {path}: {str(exc).splitlines()[0][:200]}") from None
        x = _numeric_array(arr, path)
    else:
        x = D.load_unlabeled_dir(path, **features)
    check_inputs(x, features, str(path))
    return x


def _numeric_array(arr, path: Path) -> torch.Tensor:
    """A loaded .npy/.pt object as a float tensor, or DataError: it must be a dense array of numbers
    with a sample axis (not a dict, text, a sparse or structured array, or a single number)."""
    if isinstance(arr, torch.Tensor):
        if arr.layout != torch.strided:
            raise D.DataError(f"input array {path} is a {arr.layout} tensor; save a dense one")
        if arr.is_complex() or not (arr.is_floating_point() or arr.dtype in (torch.int8, torch.int16, torch.int32,
                                                                            torch.int64, torch.uint8, torch.bool)):
            raise D.DataError(f"input array {path} holds {arr.dtype} values, not real numbers")
        x = arr.detach().to(torch.float32)
    elif isinstance(arr, np.ndarray):
        if arr.dtype.kind not in "biuf":
            raise D.DataError(f"input array {path} holds {arr.dtype} values, not numbers")
        x = torch.from_numpy(np.array(arr, dtype=np.float32))
    else:
        raise D.DataError(f"{path} holds a {type(arr).__name__}, not an array of model inputs")
    if x.dim() == 0:
        raise D.DataError(f"input array {path} is a single number, not samples of model inputs")
    return x


def check_inputs(x: torch.Tensor, features: dict, where: str) -> None:
    want = input_shape(features)
    if x.dim() == 0 or len(x) == 0:
        raise D.DataError(f"no samples in {where}")
    if tuple(x.shape[1:]) != want:
        raise D.DataError(f"inputs in {where} have shape {tuple(x.shape[1:])}, the model expects {want}")
    if not torch.isfinite(x).all():
        raise D.DataError(f"inputs in {where} contain NaN or infinite values")
