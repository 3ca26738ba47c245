"""Mask: which connections of each prunable layer are kept. A first-class object that can be
applied, saved/loaded bit-exactly, compared, counted and compacted into a smaller model."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.io import atomic_write_bytes
from common.model.architectures import following_batchnorm, prunable_layers

MAGIC = b"FPMASK1\n"


class MaskError(ValueError):
    pass


def pack_bits(layers: dict) -> bytes:
    """The bitmap codec every mask on disk or on the wire uses: 1 bit per connection (kept = 1) in
    layer order, zlib level 9."""
    return zlib.compress(np.packbits(_flat(layers).cpu().numpy()).tobytes(), 9)


def unpack_bits(body: bytes, total: int) -> np.ndarray:
    """`total` bits (bool) out of pack_bits' bytes. Inflates no further than they need, so a zlib
    bomb stops at that bound. zlib.error for corrupt data; BitCountError when the count is wrong."""
    want = (total + 7) // 8
    raw = zlib.decompressobj().decompress(body, want + 1)
    if len(raw) != want:
        raise BitCountError(f"{len(raw) * 8} bits, {total} expected")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:total].astype(bool)


class BitCountError(ValueError):
    """A bitmap whose length does not match the layers it should cover."""


def _flat(layers: dict) -> torch.Tensor:
    """Every layer's flags end to end, in the layers' order (one tensor, where they are)."""
    return torch.cat([v.flatten() for v in layers.values()])


def apply_plan(model: nn.Module) -> list:
    """(name, layer, the BatchNorm right after it or None) for each prunable layer: what
    Mask.apply walks."""
    mods = dict(model.named_modules())
    bn_after = following_batchnorm(model)
    return [(name, m, mods[bn_after[name]] if name in bn_after else None) for name, m in prunable_layers(model).items()]


class Mask:
    def __init__(self, layers: dict[str, torch.Tensor]):
        # A mask made on a GPU (each candidate of the stop rule's search there) stays there until
        # something reads it on the CPU: applying it to the model on that GPU then copies nothing.
        # A copy to the CPU and back per candidate was a large share of a GPU personalization.
        held = {k: v.to(torch.bool) for k, v in layers.items()}
        on_cpu = all(v.device.type == "cpu" for v in held.values())
        self._held, self._cpu = held, held if on_cpu else None

    @property
    def layers(self) -> dict[str, torch.Tensor]:
        """The kept flags per layer, on the CPU (copied there once, the first time they are read)."""
        if self._cpu is None:
            # one copy for all layers, as views of it (a mask made on the CPU is views of one
            # flat tensor too): a copy per layer is a host sync each
            held = self._held
            if not held:
                self._cpu = {}
                return self._cpu
            flat = _flat(held).cpu()
            parts = flat.split([v.numel() for v in held.values()])
            self._cpu = {k: p.view(v.shape) for (k, v), p in zip(held.items(), parts)}
        return self._cpu

    def held(self) -> dict[str, torch.Tensor]:
        """The kept flags per layer on the device they were made on (read-only: shared)."""
        return self._held

    # ------------------------------------------------------------ construction
    @classmethod
    def dense(cls, model: nn.Module) -> "Mask":
        return cls({n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_layers(model).items()})

    @classmethod
    def from_model(cls, model: nn.Module) -> "Mask":
        """Read the mask off a model's zero weights (a pruned checkpoint)."""
        return cls({n: m.weight.detach() != 0 for n, m in prunable_layers(model).items()})

    def copy(self) -> "Mask":
        return Mask({k: v.clone() for k, v in self._held.items()})

    # ------------------------------------------------------------ counting
    def kept(self) -> int:
        # count_nonzero, not sum() (summing a bool tensor is far slower); counted where the flags
        # are, so a GPU syncs once, not per layer. On a GPU the layers are counted as one copy
        # (two kernels, not a launch per layer); the CPU counts each layer in place
        held = list(self._held.values())
        if not held:
            return 0
        if held[0].is_cuda:
            return int(torch.count_nonzero(_flat(self._held)))
        return int(torch.stack([torch.count_nonzero(v) for v in held]).sum())

    def total(self) -> int:
        return int(sum(v.numel() for v in self._held.values()))

    def sparsity(self) -> float:
        return 1.0 - self.kept() / max(self.total(), 1)

    def layer_sparsity(self) -> dict[str, float]:
        return {k: 1.0 - v.float().mean().item() for k, v in self.layers.items()}

    def dead_units(self) -> dict[str, torch.Tensor]:
        """Output units/channels whose incoming connections are all pruned."""
        return {k: ~v.reshape(v.shape[0], -1).any(1) for k, v in self.layers.items()}

    # ------------------------------------------------------------ comparison
    def _check_compatible(self, other: "Mask"):
        if self.layers.keys() != other.layers.keys() or any(
                self.layers[k].shape != other.layers[k].shape for k in self.layers):
            raise MaskError("masks belong to different model shapes")

    def _flat_pruned(self) -> torch.Tensor:
        return ~_flat(self.layers)

    def jaccard(self, other: "Mask") -> float:
        """Jaccard similarity of the sets of pruned connections (1.0 when both prune nothing)."""
        self._check_compatible(other)
        a, b = self._flat_pruned(), other._flat_pruned()
        union = (a | b).sum().item()
        return 1.0 if union == 0 else (a & b).sum().item() / union

    def hamming(self, other: "Mask", normalized: bool = True) -> float:
        self._check_compatible(other)
        d = (self._flat_pruned() ^ other._flat_pruned()).sum().item()
        return d / self.total() if normalized else d

    def diff(self, other: "Mask") -> dict[str, dict[str, int]]:
        """Per layer: connections pruned only in self, only in other."""
        self._check_compatible(other)
        return {k: {"only_self": int((~v & other.layers[k]).sum()), "only_other": int((v & ~other.layers[k]).sum())}
                for k, v in self.layers.items()}

    def __eq__(self, other):
        return isinstance(other, Mask) and self.layers.keys() == other.layers.keys() and all(
            torch.equal(v, other.layers[k]) for k, v in self.layers.items())

    # ------------------------------------------------------------ applying
    @torch.no_grad()
    def apply(self, model: nn.Module, plan: list | None = None, dead: dict | None = None) -> nn.Module:
        """Zero pruned weights in place. A unit with no incoming connection left is silenced
        completely (bias and its BatchNorm's affine set to 0) so that compaction is exact.
        `plan`: apply_plan(model), built once by a caller that applies many masks to one model
        (walking the modules each time costs small models more than their passes). `dead`: a
        dict to record each layer's silenced units in (bool per unit)."""
        plan = apply_plan(model) if plan is None else plan
        held = self._held
        if len(plan) != len(held) or any(name not in held for name, _, _ in plan):
            raise MaskError("mask does not match the model's prunable layers")
        for name, m, bn in plan:
            keep = held[name].to(m.weight.device)
            if keep.shape != m.weight.shape:
                raise MaskError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(m.weight.shape)} in {name}")
            m.weight.masked_fill_(~keep, 0.0)  # +0.0, not -0.0: a pruned weight reads back bit-exact
            # a unit with no kept connection: the max of its flags as bytes is 0 (a byte reduction
            # over a row is far faster than all() of the pruned flags on a large layer)
            silent = keep.view(torch.uint8).reshape(keep.shape[0], -1).amax(1) == 0
            if dead is not None:
                dead[name] = silent
            # masked_fill_ with the silent rows, never `if silent.any()` on a GPU: there that question
            # is a host sync per layer (53 on ResNet50: a third of an inference pass per candidate);
            # on the CPU it is cheaper than the three fills it saves where no unit is silent
            if not silent.is_cuda and not bool(silent.any()):
                continue
            if m.bias is not None:
                m.bias.masked_fill_(silent, 0.0)
            if bn is not None:
                bn.weight.masked_fill_(silent, 0.0)
                bn.bias.masked_fill_(silent, 0.0)
        return model

    # ------------------------------------------------------------ serialization
    def to_bytes(self) -> bytes:
        """1 bit per connection, zlib-compressed, with a JSON header of names and shapes."""
        header = json.dumps({"layers": [[k, list(v.shape)] for k, v in self.layers.items()]}).encode()
        return MAGIC + len(header).to_bytes(4, "little") + header + pack_bits(self.layers)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Mask":
        try:
            if not data.startswith(MAGIC):
                raise MaskError("not a fineprune mask (bad magic)")
            n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
            header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + n])
            sizes = [int(np.prod(s)) for _, s in header["layers"]]
            try:
                flat = unpack_bits(data[len(MAGIC) + 4 + n:], sum(sizes))
            except BitCountError:
                raise MaskError("mask payload length does not match its header") from None
        except MaskError:
            raise
        except Exception as exc:  # truncated/corrupt data of any kind
            raise MaskError(f"corrupt mask data: {exc}") from None
        out, off = {}, 0
        for (name, shape), size in zip(header["layers"], sizes):
            out[name] = torch.from_numpy(flat[off:off + size].reshape(shape).copy())
            off += size
        return cls(out)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        path = Path(path)
        if not path.is_file():
            raise MaskError(f"mask file not found: {path}")
        return cls.from_bytes(path.read_bytes())
