"""Mask summaries: what a device uploads instead of weights or data.

Levels:
  stats   per-layer pruned counts and usage histograms
  sketch  stats + per-layer b-bit one-permutation MinHash signatures of the pruned set, from
          which the server estimates pairwise Jaccard similarity of masks
  bitmap  stats + the exact mask, 1 bit per prunable weight, zlib-compressed

Private mode (bitmap only, `epsilon` set): the bitmap is randomized response of the mask
(common/wire/privacy.py), per-layer counts are those of the noisy bitmap, and no usage histograms are
sent; the header names the mechanism and epsilon so the server can debias.

Any level of a run whose prior pools class directions may carry the device's class means
(common/engine/class_prior.py): classes x features float16 numbers and the class counts, in the
header; never a private one.

Layer names and shapes are not sent: they follow from the base model, named by its fingerprint.
Wire format: MAGIC | u32 header length | JSON header | u32 sketch length | sketch | bitmap.

Why ~320 lines in one module: building, encoding, decoding and validating a summary are one
contract with the server; every field written here is checked here, so a change to one side is
seen beside the other.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from common.engine.class_prior import check_contribution
from common.model.mask import BitCountError, Mask, pack_bits, unpack_bits
from common.settings import BY_NAME
from common.wire.privacy import check_epsilon, permanent_randomize, randomize

MAGIC = b"FPSUM\x01"
FORMAT_VERSION = 1
LEVELS = ("stats", "sketch", "bitmap")
HIST_EDGES = np.linspace(-6.0, 2.0, 9)   # log10(usage) bins; under/overflow go to the end bins
SKETCH_BITS = 2                           # b-bit MinHash: 2 bits per bin
MAX_SUMMARY_BYTES = 64 << 20
PRIVACY_MECHANISM = "randomized-response"
SKETCH_FRAC = BY_NAME["sketch-frac"].default  # the run sends its own; this is the table's default


class SummaryError(ValueError):
    """A summary the server must reject; the message is the logged reason, `kind` its category
    (counted in the run report)."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Summary:
    level: str
    fingerprint: str
    pruned: list[int]                 # pruned connections per layer, base-model layer order
    hist: list[list[int]] | None      # usage histogram per layer (all connections); None if private
    bins: list[int] | None = None     # sketch bins per layer
    sketch: list[np.ndarray] | None = None  # per layer: uint8 b-bit values, 255 = empty set
    bitmap: Mask | None = None        # exact mask (pruned = False), or its randomized response
    version: int = FORMAT_VERSION
    epsilon: float | None = None      # private mode: randomized response at this epsilon
    classes: tuple | None = None      # (means (classes, features), counts (classes,)): class_prior's


# ---------------------------------------------------------------- hashing
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fast, well-mixed 64-bit hash (wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sketch_layer(pruned_idx: np.ndarray, bins: int, layer: int, seed: int = 0) -> np.ndarray:
    """One-permutation MinHash with rotation densification (Shrivastava & Li 2014), keeping the
    lowest SKETCH_BITS bits of each bin's minimum. O(n) in the pruned set size."""
    if len(pruned_idx) == 0:
        return np.full(bins, 255, dtype=np.uint8)
    key = np.uint64((seed * 1_000_003 + layer + 1) * 0x9E3779B97F4A7C15 % (1 << 64))
    h = _mix64(pruned_idx.astype(np.uint64) ^ key)
    b = (h % np.uint64(bins)).astype(np.int64)
    v = h // np.uint64(bins)
    mins = np.full(bins, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(mins, b, v)
    empty = mins == np.iinfo(np.uint64).max
    if empty.any():  # borrow from the next non-empty bin to the right (circular), with an offset
        filled = np.flatnonzero(~empty)
        pos = np.searchsorted(filled, np.arange(bins)) % len(filled)
        src = filled[pos]
        dist = (src - np.arange(bins)) % bins
        mins = np.where(empty, _mix64(mins[src] + dist.astype(np.uint64) * np.uint64(0x632BE59BD9B4E019)), mins)
    return (mins & np.uint64((1 << SKETCH_BITS) - 1)).astype(np.uint8)


def sketch_budget(layer_sizes: list[int], model_bytes: int, frac: float = SKETCH_FRAC, min_bins: int = 8) -> list[int]:
    """Bins per layer: `frac` of the dense model size, shared in proportion to layer size."""
    total_bins = int(frac * model_bytes * 8 / SKETCH_BITS)
    n = sum(layer_sizes)
    return [max(min_bins, int(total_bins * s / n)) for s in layer_sizes]


# ---------------------------------------------------------------- building
def usage_histograms(usage: dict[str, torch.Tensor]) -> list[list[int]]:
    out = []
    for s in usage.values():
        v = np.log10(s.detach().double().cpu().numpy().ravel() + 1e-12)
        idx = np.clip(np.searchsorted(HIST_EDGES, v, side="right") - 1, 0, len(HIST_EDGES) - 2)
        out.append(np.bincount(idx, minlength=len(HIST_EDGES) - 1).astype(int).tolist())
    return out


def build_summary(mask: Mask, hist: list[list[int]], level: str, fingerprint: str, model_bytes: int,
                  seed: int = 0, sketch_frac: float = SKETCH_FRAC, epsilon: float | None = None,
                  privacy_seed: int | None = None, privacy_key: bytes | None = None,
                  classes: tuple | None = None) -> Summary:
    """`epsilon`: private mode (bitmap level only). `privacy_key` (a device's secret): permanent
    randomized response, the same noisy bits however often it is asked; else `privacy_seed` makes
    its noise repeatable (tests), and without either the noise comes from the OS. `classes`: the
    device's class means and counts (never with `epsilon`)."""
    if classes is not None and epsilon is not None:
        raise ValueError("a private summary carries no class means: they are exact")
    if level not in LEVELS:
        raise ValueError(f"unknown summary level '{level}' (choose from: {', '.join(LEVELS)})")
    if epsilon is not None:
        if level != "bitmap":
            raise ValueError(f"private summaries (privacy epsilon) need summary level 'bitmap', not '{level}'")
        mask = (permanent_randomize(mask, epsilon, privacy_key) if privacy_key is not None
                else randomize(mask, epsilon, privacy_seed))
        hist = None
    layers = list(mask.layers.values())
    s = Summary(level, fingerprint, [int((~m).sum()) for m in layers], hist, epsilon=epsilon)
    if classes is not None:
        s.classes = (classes[0].detach().float().cpu().to(torch.float16), classes[1].detach().cpu().round().long())
    if level == "sketch":
        s.bins = sketch_budget([m.numel() for m in layers], model_bytes, sketch_frac)
        s.sketch = [sketch_layer(np.flatnonzero(~m.flatten().numpy()), k, i, seed)
                    for i, (m, k) in enumerate(zip(layers, s.bins))]
    if level == "bitmap":
        s.bitmap = mask
    return s


# ---------------------------------------------------------------- wire format
def encode(s: Summary) -> bytes:
    head = {"v": s.version, "level": s.level, "fp": s.fingerprint, "pruned": s.pruned, "hist": s.hist,
            "bins": s.bins, "bits": SKETCH_BITS}
    if s.epsilon is not None:
        head["privacy"] = {"mechanism": PRIVACY_MECHANISM, "epsilon": s.epsilon}
    if s.classes is not None:
        head["classes"] = {"means": means_text(s.classes[0]), "counts": s.classes[1].tolist()}
    header = json.dumps(head, separators=(",", ":")).encode()
    sketch = b""
    if s.sketch is not None:
        sketch = np.packbits(np.unpackbits(np.concatenate(s.sketch)[:, None], axis=1)[:, -SKETCH_BITS:]).tobytes()
    bitmap = b""
    if s.bitmap is not None:
        bitmap = pack_bits(s.bitmap.layers)
    return MAGIC + struct.pack("<I", len(header)) + header + struct.pack("<I", len(sketch)) + sketch + bitmap


def decode(data: bytes, fingerprint: str, shapes: dict[str, tuple], max_bytes: int = MAX_SUMMARY_BYTES,
           epsilon: float | None = None, sketch_bins: list[int] | None = None,
           classes_shape: tuple | None = None) -> Summary:
    """Parse and validate a summary against the base model it claims to describe and the run's
    privacy setting (`epsilon`: private summaries at exactly this epsilon; None: no private ones).
    `sketch_bins`: the run's sketch size per layer; a sketch of any other size is refused (the
    analysis compares sketches bin by bin). `classes_shape`: (classes, features) where the run
    asks for class means (a summary may still lack them); None: a summary that carries them is
    refused. Raises SummaryError naming the first problem found."""
    if not isinstance(data, (bytes, bytearray)):
        raise SummaryError(f"summary is {type(data).__name__}, expected bytes", "format")
    if len(data) > max_bytes:
        raise SummaryError(f"summary of {len(data)} bytes exceeds the limit of {max_bytes}", "size")
    if not data.startswith(MAGIC):
        raise SummaryError("not a fineprune summary (bad magic)", "format")
    try:
        off = len(MAGIC)
        (n,) = struct.unpack_from("<I", data, off)
        h = json.loads(data[off + 4:off + 4 + n])
        off += 4 + n
        (m,) = struct.unpack_from("<I", data, off)
        sketch_raw = data[off + 4:off + 4 + m]
        if len(sketch_raw) != m:
            raise SummaryError("summary truncated inside the sketch", "format")
        bitmap_raw = data[off + 4 + m:]
    except SummaryError:
        raise
    except Exception as exc:
        raise SummaryError(f"corrupt summary header: {type(exc).__name__}", "format") from None
    if not isinstance(h, dict):
        raise SummaryError("corrupt summary header", "format")
    if h.get("v") != FORMAT_VERSION:
        raise SummaryError(f"summary format version {h.get('v')!r}, server reads {FORMAT_VERSION}", "version")
    if h.get("fp") != fingerprint:
        raise SummaryError(f"summary is for base model {str(h.get('fp'))[:12]}, not {fingerprint[:12]}",
                           "fingerprint")
    level = h.get("level")
    if level not in LEVELS:
        raise SummaryError(f"unknown summary level {level!r}", "format")
    eps = _privacy_of(h, level, epsilon)
    sizes = [int(np.prod(s)) for s in shapes.values()]
    pruned, hist = h.get("pruned"), h.get("hist")
    if not (isinstance(pruned, list) and len(pruned) == len(sizes)):
        raise SummaryError(f"summary has {len(pruned) if isinstance(pruned, list) else 'no'} layers, "
                           f"base model has {len(sizes)}", "shape")
    for p, size in zip(pruned, sizes):
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= size:
            raise SummaryError(f"pruned count {p!r} out of range [0, {size}]", "range")
    if eps is not None:
        if hist is not None:
            raise SummaryError("a private summary must not carry usage histograms", "privacy")
    elif not (isinstance(hist, list) and len(hist) == len(sizes)):
        raise SummaryError("usage histograms missing or of the wrong length", "shape")
    else:
        for row, size in zip(hist, sizes):
            if not (isinstance(row, list) and len(row) == len(HIST_EDGES) - 1
                    and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row)
                    and sum(row) == size):
                raise SummaryError("usage histogram malformed (wrong bins, negative or wrong total)", "range")
    s = Summary(level, h["fp"], pruned, hist, version=h["v"], epsilon=eps)
    if "classes" in h:
        s.classes = _classes_of(h["classes"], classes_shape, eps)
    if level == "sketch":
        bins = h.get("bins")
        if h.get("bits") != SKETCH_BITS or not (isinstance(bins, list) and len(bins) == len(sizes)
                                                 and all(isinstance(b, int) and 0 < b <= size for b, size in zip(bins, sizes))):
            raise SummaryError("sketch bins malformed", "shape")
        if sketch_bins is not None and list(bins) != list(sketch_bins):
            raise SummaryError("sketch bins are not the run's", "shape")
        total = sum(bins)
        if len(sketch_raw) != math.ceil(total * SKETCH_BITS / 8):
            raise SummaryError(f"sketch has {len(sketch_raw)} bytes, header says {total} bins", "shape")
        bits = np.unpackbits(np.frombuffer(sketch_raw, dtype=np.uint8))[:total * SKETCH_BITS].reshape(total, SKETCH_BITS)
        vals = (bits * (1 << np.arange(SKETCH_BITS - 1, -1, -1))).sum(1).astype(np.uint8)
        s.bins, s.sketch, o = bins, [], 0
        for b, p in zip(bins, pruned):
            s.sketch.append(vals[o:o + b] if p else np.full(b, 255, dtype=np.uint8))
            o += b
    elif sketch_raw:
        raise SummaryError(f"level '{level}' carries an unexpected sketch", "format")
    if level == "bitmap":
        try:
            flat = unpack_bits(bitmap_raw, sum(sizes))
        except zlib.error:
            raise SummaryError("bitmap is not valid zlib data", "format") from None
        except BitCountError as exc:
            raise SummaryError(f"bitmap has {exc}: one per weight of the base model", "shape") from None
        layers, o = {}, 0
        for (name, shape), size, p in zip(shapes.items(), sizes, pruned):
            layers[name] = torch.from_numpy(flat[o:o + size].reshape(shape).copy())
            if int((~layers[name]).sum()) != p:
                raise SummaryError(f"bitmap of layer {name} disagrees with its pruned count", "range")
            o += size
        s.bitmap = Mask(layers)
    elif bitmap_raw:
        raise SummaryError(f"level '{level}' carries an unexpected bitmap", "format")
    return s


def means_text(means: torch.Tensor) -> str:
    """Class means as they travel and are kept: float16, base64."""
    return base64.b64encode(means.detach().cpu().to(torch.float16).contiguous().numpy().tobytes()).decode()


def means_from_text(text: str, shape) -> torch.Tensor:
    """means_text's inverse, as float32 of `shape` (its length checked by the caller where untrusted)."""
    raw = base64.b64decode(text)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float16).reshape(tuple(shape)).astype(np.float32))


def _classes_of(c, shape: tuple | None, eps: float | None) -> tuple:
    """A summary's class means and counts, checked (common/engine/class_prior.py says what fits)."""
    if eps is not None:
        raise SummaryError("a private summary must not carry class means", "privacy")
    if shape is None:
        raise SummaryError("summary carries class means the run does not ask for", "extra-content")
    if not (isinstance(c, dict) and set(c) == {"means", "counts"} and isinstance(c["means"], str)
            and isinstance(c["counts"], list) and len(c["counts"]) == shape[0]
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**9 for v in c["counts"])):
        raise SummaryError("class means malformed (want base64 float16 means and a whole count per class)", "shape")
    try:
        raw = base64.b64decode(c["means"], validate=True)
    except (binascii.Error, ValueError):
        raise SummaryError("class means are not base64", "format") from None
    if len(raw) != 2 * shape[0] * shape[1]:
        raise SummaryError(f"class means have {len(raw)} bytes, {shape[0]} x {shape[1]} float16 take "
                           f"{2 * shape[0] * shape[1]}", "shape")
    means = means_from_text(c["means"], shape)
    counts = torch.tensor(c["counts"], dtype=torch.float32)
    why = check_contribution(means, counts, *shape)
    if why is not None:
        raise SummaryError(why, "range")
    return means, counts


def _privacy_of(h: dict, level: str, expected: float | None) -> float | None:
    """The summary's epsilon, checked against the run's privacy setting."""
    priv = h.get("privacy")
    if priv is None:
        if expected is not None:
            raise SummaryError(f"the run requires private summaries (epsilon {expected}); this one is not",
                               "privacy")
        return None
    if not (isinstance(priv, dict) and priv.get("mechanism") == PRIVACY_MECHANISM):
        raise SummaryError(f"unknown privacy mechanism in {priv!r}", "privacy")
    try:
        eps = check_epsilon(priv.get("epsilon"))
    except ValueError as exc:
        raise SummaryError(str(exc), "privacy") from None
    if level != "bitmap":
        raise SummaryError(f"private summaries must be bitmaps, not '{level}'", "privacy")
    if expected is None or eps != expected:
        raise SummaryError(f"summary privacy epsilon {eps} is not the run's ({expected})", "privacy")
    return eps
