"""Model checkpoints with the metadata a device needs: task, classes, input features, version.
Loading validates everything and raises CheckpointError with one clear message. Why ~310 lines:
what is written and every check of it on the way back in are one format, kept side by side."""
from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import torch
import torch.nn as nn

from common import __version__
from common.data.tasks import input_shape
from common.io import atomic_write_bytes
from common.model.architectures import build_model, prunable_layers
from common.model.mask import Mask, MaskError
from common.model.restricted import OutputRestricted

FORMAT = "fineprune-checkpoint"
FORMAT_VERSION = 2  # 2: pruned weights stored sparse (only the kept values); 1 still reads
READS = (1, 2)


class CheckpointError(ValueError):
    pass


# What a device needs to rebuild and feed a model: the one list of a checkpoint's model metadata
MODEL_META = ("arch", "arch_kwargs", "task", "classes", "features")
# What the vendor may record beside it for the device's adaptation checks (common/engine/adapt.py): optional
VENDOR_META = ("class_counts", "class_spread", "class_moments", "input_profile", "input_rms", "hidden_record",
               "first_layer_means", "class_directions")
VENDOR_LIMITS = {"spread_values": 200_000, "moment_values": 1_000_000, "profile_values": 65_536,
                 "hidden_values": 65_536, "first_values": 1_000_000, "direction_values": 1_000_000}


# What a device accepts from model metadata it did not make (a server's message, a downloaded
# checkpoint): every size bounded before anything is allocated, no paths on this device named.
LIMITS = {"widths": 4096, "num_classes": 10_000, "n_mels": 256, "image_size": 1024, "seconds": 30,
          "checkpoint_bytes": 1 << 30}
ARCH_KEYS = {"smallcnn": {"num_classes", "widths", "in_channels", "image_size", "batchnorm"},
             "kws": {"num_classes", "widths", "sample_rate", "n_mels", "clip_samples", "batchnorm"},
             "resnet18": {"num_classes"}, "resnet50": {"num_classes"}}
RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


def check_model_meta(meta: dict) -> dict:
    """Model metadata from the other side of a wire, checked: known architecture, only that
    architecture's constructor arguments, every size within LIMITS, features that fit them."""
    meta = model_meta(meta)
    arch, kw, feat = meta["arch"], meta["arch_kwargs"], meta["features"]
    if arch not in ARCH_KEYS:
        raise CheckpointError(f"unknown model '{arch}'")
    if not isinstance(kw, dict) or set(kw) - ARCH_KEYS[arch]:
        raise CheckpointError(f"model arguments {sorted(kw) if isinstance(kw, dict) else kw!r} are not "
                              f"{arch}'s ({', '.join(sorted(ARCH_KEYS[arch]))})")

    for w in kw.get("widths", ()) if isinstance(kw.get("widths", ()), (list, tuple)) else [kw.get("widths")]:
        _count("widths", w, LIMITS["widths"])
    _count("num_classes", kw.get("num_classes", 10), LIMITS["num_classes"])
    _count("n_mels", kw.get("n_mels", 40), LIMITS["n_mels"])
    _count("in_channels", kw.get("in_channels", 1), 3)
    if not isinstance(kw.get("batchnorm", True), bool):
        raise CheckpointError(f"model metadata batchnorm={kw.get('batchnorm')!r} is not true or false")
    if kw.get("sample_rate", 8000) not in RATES:
        raise CheckpointError(f"model metadata sample_rate={kw.get('sample_rate')!r} is not one of {RATES}")
    check_features(feat)
    audio_arch = arch == "kws"
    if audio_arch != (feat["kind"] == "audio"):
        raise CheckpointError(f"model '{arch}' takes {'audio' if audio_arch else 'images'}, but its metadata "
                              f"names {feat['kind']} inputs")
    pairs = ([("sample_rate", "sample_rate", 8000), ("clip_samples", "clip_samples", 8000)] if audio_arch else
             [("image_size", "image_size", 8), ("in_channels", "channels", 1)] if arch == "smallcnn" else [])
    for k_arch, k_feat, default in pairs:
        if kw.get(k_arch, default) is not None and kw.get(k_arch, default) != feat.get(k_feat):
            raise CheckpointError(f"model metadata {k_feat}={feat.get(k_feat)!r} does not match the model's "
                                  f"{k_arch}={kw.get(k_arch, default)!r}")
    if not isinstance(meta["task"], str) or not 0 < len(meta["task"]) <= 100:
        raise CheckpointError("model metadata task is not a short name")
    check_classes(meta["classes"])
    _check_vendor_record(meta)
    return meta


def _count(name, v, hi, lo=1):
    """An integer size from metadata, within [lo, hi], or CheckpointError."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"model metadata {name}={v!r} outside [{lo}, {hi}]")


def check_features(feat) -> dict:
    """What one input is (audio at a known rate and bounded length, or a bounded image), checked:
    a device allocates what it says."""
    if not isinstance(feat, dict) or feat.get("kind") not in ("audio", "image"):
        raise CheckpointError(f"model metadata features {feat!r} are not audio or image inputs")
    if feat["kind"] == "audio":
        if feat.get("sample_rate") not in RATES:
            raise CheckpointError(f"features sample_rate={feat.get('sample_rate')!r} is not one of {RATES}")
        _count("clip_samples", feat.get("clip_samples"), LIMITS["seconds"] * feat["sample_rate"])
    else:
        _count("image_size", feat.get("image_size"), LIMITS["image_size"])
        _count("channels", feat.get("channels"), 3)
    return feat


def check_classes(classes) -> list:
    if not (isinstance(classes, list) and len(classes) <= LIMITS["num_classes"]
            and all(isinstance(c, str) and len(c) <= 100 for c in classes)):
        raise CheckpointError("model metadata classes are not a list of short names")
    return classes


def _numbers(vals, lo=-math.inf, hi=math.inf) -> bool:
    return isinstance(vals, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and math.isfinite(v) and lo <= v <= hi for v in vals)


def _check_vendor_record(meta: dict) -> None:
    """The optional vendor record: well-typed and bounded (a device allocates what it says)."""
    counts = meta.get("class_counts")
    if counts is not None and not (_numbers(counts, 0.0) and 1 <= len(counts) <= LIMITS["num_classes"]):
        raise CheckpointError("model metadata class_counts is not one non-negative number per class")
    spread = meta.get("class_spread")
    if spread is not None:
        if not (isinstance(spread, list) and sum(len(v) if isinstance(v, list) else 0 for v in spread)
                <= VENDOR_LIMITS["spread_values"] and all(_numbers(v, 0.0, 1.0) for v in spread)):
            raise CheckpointError("model metadata class_spread is not lists of numbers in [0, 1]")
    moments = meta.get("class_moments")
    if moments is not None and not _moments_ok(moments):
        raise CheckpointError("model metadata class_moments is not, per layer, each class's channel means and "
                              "mean squares")
    prof = meta.get("input_profile")
    if prof is not None:
        shape = prof.get("shape") if isinstance(prof, dict) else None
        ok = (isinstance(shape, list) and 1 <= len(shape) <= 3
              and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= VENDOR_LIMITS["profile_values"]
                      for d in shape) and math.prod(shape) <= VENDOR_LIMITS["profile_values"])
        if not (ok and _numbers(prof.get("values")) and len(prof["values"]) == math.prod(shape)):
            raise CheckpointError("model metadata input_profile is not a shape and its numbers")
    level = meta.get("input_rms")
    if level is not None and not _numbers([level], 0.0):
        raise CheckpointError("model metadata input_rms is not a non-negative number")
    hid = meta.get("hidden_record")
    if hid is not None:
        keys = ("mean", "var", "spread")
        ok = isinstance(hid, dict) and set(hid) == {"layer", *keys} and isinstance(hid["layer"], str) \
            and len(hid["layer"]) <= 200 and all(isinstance(hid[k], list) for k in keys)
        if not (ok and 1 <= len(hid["mean"]) <= VENDOR_LIMITS["hidden_values"]
                and len({len(hid[k]) for k in keys}) == 1 and _numbers(hid["mean"])
                and _numbers(hid["var"], 0.0) and _numbers(hid["spread"], 0.0, 1.0)):
            raise CheckpointError("model metadata hidden_record is not a layer name and its channels' mean, "
                                  "variance and class spread")
    for key, limit, what in (("first_layer_means", "first_values", "channels' means"),
                              ("class_directions", "direction_values", "mean centred features")):
        if meta.get(key) is not None and not _rows_ok(meta[key], VENDOR_LIMITS[limit]):
            raise CheckpointError(f"model metadata {key} is not a layer name and, per class, its {what}")


def recorded_rows(meta: dict | None, key: str, layer: str, shape: tuple) -> torch.Tensor | None:
    """A vendor record of one row per class for one layer (`first_layer_means`, `class_directions`)
    as a float tensor, where it names `layer` and is exactly `shape` of finite numbers; else None
    (a record for another layer or model is not read)."""
    rec = (meta or {}).get(key)
    if not isinstance(rec, dict) or rec.get("layer") != layer:
        return None
    try:
        rows = torch.tensor(rec["mean"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError):
        return None
    return rows if tuple(rows.shape) == tuple(shape) and torch.isfinite(rows).all() else None


def _rows_ok(rec, limit: int) -> bool:
    """{"layer": a short name, "mean": one row of finite numbers per class, every row as long}, at
    most `limit` numbers in all."""
    rows = rec.get("mean") if isinstance(rec, dict) else None
    return (isinstance(rec, dict) and set(rec) == {"layer", "mean"} and isinstance(rec["layer"], str)
            and len(rec["layer"]) <= 200 and isinstance(rows, list) and 1 <= len(rows) <= LIMITS["num_classes"]
            and all(isinstance(r, list) for r in rows) and len({len(r) for r in rows}) == 1
            and 1 <= len(rows[0]) and len(rows) * len(rows[0]) <= limit and all(_numbers(r) for r in rows))


def _moments_ok(moments) -> bool:
    """Per BatchNorm layer {"mean": rows, "square": rows}: one row per class, as many classes in
    every layer, finite numbers, squares not negative, VENDOR_LIMITS["moment_values"] in all."""
    if not isinstance(moments, list):
        return False
    total, classes = 0, set()
    for layer in moments:
        if not (isinstance(layer, dict) and set(layer) == {"mean", "square"}):
            return False
        mean, square = layer["mean"], layer["square"]
        if not (isinstance(mean, list) and isinstance(square, list) and len(mean) == len(square) >= 1):
            return False
        widths = {len(r) if isinstance(r, list) else -1 for r in mean + square}
        if len(widths) != 1 or min(widths) < 1:
            return False
        total += 2 * len(mean) * widths.pop()
        classes.add(len(mean))
        if total > VENDOR_LIMITS["moment_values"] or len(classes) > 1:
            return False
        if not (all(_numbers(r) for r in mean) and all(_numbers(r, 0.0) for r in square)):
            return False
    return True


def check_model_fits(model: nn.Module, meta: dict, where: str) -> None:
    """The built model takes the input its metadata names and gives one output per class: one
    sample through it, so that a checkpoint whose metadata names another task or input size is
    refused here in one line, not deep in a data pass."""
    feat = meta["features"]
    x = torch.zeros(1, *input_shape(feat))
    desc = describe_input(feat)
    was_training = model.training
    try:
        with torch.no_grad():
            y = model.eval()(x.to(next(model.parameters()).device))
    except Exception as exc:
        raise CheckpointError(f"{where}: the model does not take the input its metadata names ({desc}): "
                              f"{str(exc).splitlines()[0][:160]}") from None
    finally:
        model.train(was_training)
    if y.shape[-1] != len(meta["classes"]):
        raise CheckpointError(f"{where}: the model has {y.shape[-1]} outputs but its metadata names "
                              f"{len(meta['classes'])} classes")


def describe_input(features: dict) -> str:
    """One input as a person would say it: samples and rate of a clip, or channels and size."""
    if features["kind"] == "audio":
        return f"{features['clip_samples']} samples at {features['sample_rate']} Hz"
    return f"{features['channels']}x{features['image_size']}x{features['image_size']} images"


def model_meta(meta: dict) -> dict:
    """The model metadata of a checkpoint's (or a message's) metadata, nothing else."""
    missing = [k for k in MODEL_META if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks '{missing[0]}'")
    return {k: meta[k] for k in MODEL_META + VENDOR_META if k in meta}


def fingerprint(model_or_state) -> str:
    """Stable hash of a model's parameters and buffers: names, shapes and exact values."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def save_checkpoint(path, model: nn.Module, meta: dict, mask: Mask | None = None,
                    restricted: list[int] | None = None, private: bool = False) -> None:
    """`model` is the plain (unwrapped) model; `meta` holds arch, arch_kwargs, task, classes, features."""
    model_meta(meta)
    blob = dict(meta)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    kept = {}
    if mask is not None:  # a pruned layer stores only its kept weights: the file shrinks with sparsity
        for name, keep in mask.layers.items():
            key = f"{name}.weight"
            if key in state and state[key].shape == keep.shape:
                kept[key] = state.pop(key)[keep].clone()
    blob.update(format=FORMAT, version=FORMAT_VERSION, fineprune_version=__version__, state_dict=state,
                kept_weights=kept,
                mask=None if mask is None else torch.frombuffer(bytearray(mask.to_bytes()), dtype=torch.uint8),
                restricted_classes=restricted)
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue(), private=private)


def _checked_history(history) -> list:
    """Torch-Pruning's pruning history from a file: bounded and well-typed before it is replayed."""
    ok = isinstance(history, list) and len(history) <= 10_000 and all(
        isinstance(h, (list, tuple)) and len(h) == 3 and isinstance(h[0], str) and len(h[0]) <= 200
        and isinstance(h[1], bool) and isinstance(h[2], (list, tuple)) and len(h[2]) <= 65_536
        and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 65_536 for i in h[2])
        for h in history)
    if not ok:
        raise CheckpointError("the checkpoint's pruning history is malformed")
    return [list(h) for h in history]


def _dense_state(blob: dict, mask: Mask | None, model: nn.Module) -> dict:
    """The full state dict: sparse-stored layers rebuilt with zeros where the mask pruned."""
    state = dict(blob["state_dict"])
    kept = blob.get("kept_weights") or {}
    if kept and mask is None:
        raise CheckpointError("sparse weights without a mask")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for key, values in kept.items():
        name = key[: -len(".weight")]
        keep = mask.layers.get(name)
        if keep is None or shapes.get(key) != keep.shape or int(keep.sum()) != values.numel():
            raise CheckpointError(f"sparse weights of '{key[:80]}' do not fit the mask or the model")
        dense = torch.zeros(keep.shape, dtype=values.dtype)
        dense[keep] = values
        state[key] = dense
    return state


def _check_expansion(path: Path) -> None:
    """Before torch reads it: what the checkpoint's entries expand to stays within
    LIMITS['checkpoint_bytes'], and no entry is compressed (torch.save stores tensors as they are;
    a deflated entry is a bomb: 2.1 MB on disk made 2 GB in memory)."""
    import zipfile

    try:
        infos = zipfile.ZipFile(path).infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: torch's legacy format or garbage, which torch.load refuses or reads as stored
    total = sum(i.file_size for i in infos)
    if total > LIMITS["checkpoint_bytes"]:
        raise CheckpointError(f"checkpoint {path} expands to {total} bytes, more than the "
                              f"{LIMITS['checkpoint_bytes']} a model may take")
    if any(i.compress_type != zipfile.ZIP_STORED and i.file_size > 4 * i.compress_size + (64 << 10) for i in infos):
        raise CheckpointError(f"checkpoint {path} holds compressed entries that expand far beyond their size")


def load_checkpoint(path, device: str = "cpu"):
    """Return (model, meta, mask). The model is wrapped in OutputRestricted when the checkpoint
    restricts its outputs; the mask (if any) is already applied."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file itself (e.g. {path}/base.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_expansion(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "truncated or corrupt" if isinstance(exc, (EOFError, RuntimeError)) else "not a valid"
        raise CheckpointError(f"{kind} checkpoint file {path} ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fineprune checkpoint")
    if blob.get("version") not in READS:
        raise CheckpointError(f"{path} has checkpoint format version {blob.get('version')}, "
                              f"this fineprune reads versions {', '.join(map(str, READS))}")
    check_model_meta(blob)  # a checkpoint may come from anywhere: sizes bounded before building
    mask = None
    if blob.get("mask") is not None:
        if not (isinstance(blob["mask"], torch.Tensor) and blob["mask"].dtype == torch.uint8
                and blob["mask"].dim() == 1):
            raise CheckpointError(f"checkpoint {path}: its mask is not a byte string")
        try:
            mask = Mask.from_bytes(blob["mask"].numpy().tobytes())
        except MaskError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
    try:
        model = build_model(blob["arch"], **blob["arch_kwargs"])
        if blob.get("pruning_history"):  # a compacted residual graph: replay its channel removals
            from common.model.compact_graph import rebuild

            rebuild(model, _checked_history(blob["pruning_history"]), blob["features"])
        model.load_state_dict(_dense_state(blob, mask, model))
    except ValueError:
        raise
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} does not fit architecture '{blob.get('arch')}': "
                              f"{str(exc).splitlines()[0][:200]}") from None
    if mask is not None:
        try:
            mask.apply(model)
        except MaskError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
    meta = {k: v for k, v in blob.items() if k not in ("state_dict", "mask", "kept_weights")}
    model = model.to(device).eval()
    if blob.get("restricted_classes"):
        cls = blob["restricted_classes"]
        if not (isinstance(cls, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool)
                                                       and 0 <= c < len(meta["classes"]) for c in cls)
                and len(set(cls)) == len(cls)):
            raise CheckpointError(f"checkpoint {path}: restricted_classes is not a list of distinct class indices")
        cls = list(cls)
        n_out = list(prunable_layers(model).values())[-1].weight.shape[0]
        inner_index = cls if n_out == len(meta["classes"]) else list(range(len(cls)))
        model = OutputRestricted(model, cls, len(meta["classes"]), inner_index).to(device).eval()
    check_model_fits(model, meta, f"checkpoint {path}")
    return model, meta, mask
