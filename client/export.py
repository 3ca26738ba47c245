"""A personalized model for runtimes without Python or fineprune: ONNX (onnxruntime on any edge
CPU/GPU) and TorchScript (libtorch, PyTorch Mobile).

ONNX goes through torch's dynamo exporter (the legacy TorchScript-based exporter fails on the
audio front end's STFT); the batch dimension stays dynamic. The whole model is exported, the
log-mel front end of speech models included, and the output restriction too: classes the
personalization excluded come out as -inf, as in PyTorch. Every export is checked before it is
kept: the exported file is loaded back and must give PyTorch's predictions on probe inputs.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from common.checkpoint import input_shape
from common.io import atomic_write_bytes

FORMATS = ("onnx", "torchscript")


def probe_inputs(features: dict, n: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs to compare an export with PyTorch on: quiet noise for audio, pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *input_shape(features))
    return 0.1 * torch.randn(shape, generator=g) if features["kind"] == "audio" else torch.rand(shape, generator=g)


def _onnx_bytes(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    import warnings

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not the user's business
        path = os.path.join(d, "model.onnx")
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        return Path(path).read_bytes()


def onnx_session(model: bytes | str):
    """An onnxruntime CPU session on one thread, from the file's bytes or its path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _onnx_run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    sess = onnx_session(data)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _script_bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    return buf.getvalue()


def _script_run(data: bytes, x: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(io.BytesIO(data))(x)


def export(model: torch.nn.Module, features: dict, fmt: str, out: str | Path) -> dict:
    """Write `model` to `out` in `fmt` (atomically) after checking that the file gives the same
    predictions as PyTorch; returns sizes and the agreement measured."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}' (choose from: {', '.join(FORMATS)})")
    model = model.cpu().eval()
    x = probe_inputs(features)
    with torch.no_grad():
        want = model(x)
        data = _onnx_bytes(model, x[:2]) if fmt == "onnx" else _script_bytes(model)
        got = (_onnx_run if fmt == "onnx" else _script_run)(data, x)
    same = bool((got.argmax(1) == want.argmax(1)).all())
    finite = torch.isfinite(want)
    if not same or not torch.equal(finite, torch.isfinite(got)):
        raise RuntimeError(f"the {fmt} export does not reproduce PyTorch's predictions; nothing written")
    diff = float((got[finite] - want[finite]).abs().max()) if finite.any() else 0.0
    atomic_write_bytes(out, data)
    return {"out": str(out), "format": fmt, "bytes": len(data), "max_abs_logit_diff": diff,
            "same_predictions": same, "restricted_classes_kept": bool((~finite).any()),
            "input": features, "note": "whole model, audio front end included" if features["kind"] == "audio"
            else "whole model"}
