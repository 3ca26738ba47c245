"""Device commands of `fineprune`: personalize a base model on this user's data; evaluate a model on
labeled examples, classify files, describe a checkpoint."""
from __future__ import annotations

from common import settings as ST
from common.cli import progress_bar


def add_parser(sub, name: str, text: str):
    {"personalize": _add_personalize, "evaluate": _add_evaluate, "predict": _add_predict,
     "info": _add_info, "export": _add_export}[name](sub, name, text)


def output_file(flag: str, path, model=None, what: str = "the file", itself: str = "the model itself",
                instead: str = "the output"):
    """An output path, checked before any work: not a directory, not the model being read."""
    from pathlib import Path

    out = Path(path)
    if out.is_dir() or str(path).endswith(("/", "\\")):
        raise ValueError(f"{flag} {path} is a directory; name {what} to write")
    if out.parent != Path("") and not out.parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {out.parent} does not exist")
    if model is not None and out.exists() and out.resolve() == Path(model).resolve():
        raise ValueError(f"{flag} {out} is {itself}; write {instead} elsewhere")
    return out


def _add_export(sub, name: str, text: str):
    from client.export import FORMATS

    px = sub.add_parser(name, help=text, description=text + ". The file is checked against PyTorch before "
                        "it is written.")
    px.add_argument("--model", required=True, help="checkpoint (base or personalized)")
    px.add_argument("--format", required=True, help=f"one of: {', '.join(FORMATS)}")
    px.add_argument("--out", required=True, help="file to write (atomic)")
    px.set_defaults(func=cmd_export)


def cmd_export(args) -> dict:
    from client.export import FORMATS, export
    from common.model.checkpoint import load_checkpoint

    if args.format not in FORMATS:  # before loading anything
        raise ValueError(f"unknown export format '{args.format}' (choose from: {', '.join(FORMATS)})")
    out = output_file("--out", args.out, args.model, instead="the export")
    model, meta, _ = load_checkpoint(args.model)
    return export(model, meta["features"], args.format, out, meta["classes"])


def _add_evaluate(sub, name: str, text: str):
    pe = sub.add_parser(name, help=text, description=text + ". Labels: WAV files named {label}_..., or "
                        "image subfolders named after the classes.")
    pe.add_argument("--model", required=True, help="checkpoint to evaluate (base or personalized)")
    pe.add_argument("--data", required=True, help="directory of labeled WAV files or image subfolders")
    pe.add_argument("--baseline", help="a second checkpoint (e.g. the base) evaluated on the same data")
    pe.add_argument("--out", help="write the results as JSON here (atomic)")
    pe.add_argument("--plot", help="write the confusion matrices as PNG here")
    pe.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> dict:
    import json
    from pathlib import Path

    import torch

    from client.labeled import evaluate, labeled_files, load_file, plot_confusion
    from common.io import atomic_write_text
    from common.model.checkpoint import CheckpointError, load_checkpoint

    for flag in ("out", "plot"):
        if getattr(args, flag):
            output_file(f"--{flag}", getattr(args, flag))
    model, meta, _ = load_checkpoint(args.model)
    models = {"model": (model, meta)}
    if args.baseline:
        b, bmeta, _ = load_checkpoint(args.baseline)
        if bmeta["classes"] != meta["classes"] or bmeta["features"] != meta["features"]:
            raise CheckpointError(f"--baseline {args.baseline} has other classes or inputs than --model")
        models["baseline"] = (b, bmeta)
    files, labels = labeled_files(args.data, meta["features"], meta["classes"])
    x = torch.stack([load_file(p, meta["features"]) for p in files])
    y = torch.tensor(labels)
    results = {name: evaluate(m, x, y, meta["classes"]) for name, (m, _) in models.items()}
    out = {"data": str(args.data), "n": len(y), "model": str(args.model),
           **({"baseline": str(args.baseline)} if args.baseline else {}),
           "accuracy": {k: r["accuracy"] for k, r in results.items()}, "results": results}
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=2))
    if args.plot:
        plot_confusion(results, Path(args.plot))
    return {k: v for k, v in out.items() if k != "results"} | {
        "per_class": {k: {c: r["accuracy"] for c, r in res["per_class"].items()} for k, res in results.items()},
        "confusion": {k: _present_confusion(res["confusion"]) for k, res in results.items()}}


def _present_confusion(cm: dict) -> dict:
    """The confusion matrix over the classes that occur (as a label or a prediction): rows are the
    true class, columns the predicted one."""
    rows = cm["rows_true_cols_predicted"]
    keep = [i for i in range(len(rows)) if sum(rows[i]) or sum(r[i] for r in rows)]
    return {"classes": [cm["classes"][i] for i in keep],
            "rows_true_cols_predicted": [[rows[i][j] for j in keep] for i in keep]}


def _add_predict(sub, name: str, text: str):
    pp = sub.add_parser(name, help=text, description=text)
    pp.add_argument("--model", required=True, help="checkpoint (base or personalized), or an ONNX file that "
                    "`fineprune export` wrote (run in onnxruntime, classes and input from its metadata)")
    pp.add_argument("files", nargs="+", metavar="FILE", help="WAV or image files")
    pp.add_argument("--top", type=int, default=1, help="classes to list per file (default 1)")
    pp.set_defaults(func=cmd_predict)


def cmd_predict(args):
    import json
    from pathlib import Path

    import torch

    from client.labeled import load_file, predict_proba
    from common.model.checkpoint import load_checkpoint

    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    paths = [Path(f) for f in args.files]
    if Path(args.model).suffix == ".onnx":
        from client.export import onnx_metadata, onnx_session

        if not Path(args.model).is_file():
            raise FileNotFoundError(f"ONNX file not found: {args.model}")
        classes, features = onnx_metadata(args.model)
        meta = {"classes": classes, "features": features}
        sess = onnx_session(args.model)

        def proba_of(x):
            return torch.softmax(torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]), 1)
    else:
        model, meta, _ = load_checkpoint(args.model)

        def proba_of(x):
            return predict_proba(model, x)
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} is not a file")
    x = torch.stack([load_file(p, meta["features"]) for p in paths])  # all checked before any output
    proba = proba_of(x)
    for p, pr in zip(paths, proba):
        top = torch.topk(pr, min(args.top, len(pr)))
        row = {"file": str(p), "class": meta["classes"][int(top.indices[0])],
               "probability": round(float(top.values[0]), 4)}
        if args.top > 1:
            row["top"] = [[meta["classes"][int(i)], round(float(v), 4)] for v, i in zip(top.values, top.indices)]
        print(json.dumps(row), flush=True)
    return None


def _add_info(sub, name: str, text: str):
    pi = sub.add_parser(name, help=text, description=text)
    pi.add_argument("checkpoint", help="a fineprune checkpoint")
    pi.set_defaults(func=cmd_info)


def cmd_info(args) -> dict:
    import os

    from common.model.checkpoint import VENDOR_META, fingerprint, load_checkpoint
    from common.model.restricted import OutputRestricted

    model, meta, mask = load_checkpoint(args.checkpoint)
    inner = model.inner if isinstance(model, OutputRestricted) else model
    restricted = meta.get("restricted_classes")
    pers = meta.get("personalization") or {}
    return {"file": str(args.checkpoint), "bytes": os.path.getsize(args.checkpoint), "task": meta["task"],
            "arch": meta["arch"], "arch_kwargs": meta["arch_kwargs"], "classes": meta["classes"],
            "input": meta["features"], "parameters": sum(p.numel() for p in inner.parameters()),
            # against the base, as `personalize` reported it: a compacted model's own mask counts only
            # what is left after whole units were removed
            "sparsity": pers["sparsity"] if pers.get("sparsity") is not None else
            (None if mask is None else round(mask.sparsity(), 4)),
            "compacted": bool(meta.get("compacted")),
            "kept_classes": None if not restricted else [meta["classes"][i] for i in restricted],
            "fingerprint": fingerprint(inner),
            "base_fingerprint": meta.get("base_fingerprint") or pers.get("base_fingerprint"),
            "fineprune_version": meta.get("fineprune_version"), "format_version": meta.get("version"),
            # what the vendor recorded for the default's checks; a check whose record is missing
            # takes its conservative side (a base from before S60 reads no input level)
            "vendor_record": [k for k in VENDOR_META if meta.get(k) is not None]}


def _add_personalize(sub, name: str, text: str):
    pz = sub.add_parser(name, help=text, description=text)
    pz.add_argument("--model", required=True, help="base checkpoint from `fineprune pretrain`")
    pz.add_argument("--data", required=True,
                    help="directory of the user's WAV or image files, or a .npy/.pt array of inputs")
    pz.add_argument("--out", required=True, help="personalized checkpoint to write")
    ST.add_options(pz, (ST.PRUNE, ST.CLI))  # every engine setting, from the one settings table
    pz.add_argument("--compact", action="store_true", help="physically remove pruned units (smaller, faster)")
    pz.add_argument("--report", help="also write the report as JSON here")
    pz.set_defaults(func=cmd_personalize)


def cmd_personalize(args) -> dict:
    import json
    import os
    from dataclasses import asdict

    from client.personalize import load_inputs, personalize
    from common.engine.prune import check_config
    from common.model.batches import resolve_device
    from common.model.checkpoint import load_checkpoint

    output_file("--out", args.out, args.model, "the personalized checkpoint file", "the base model itself",
                "the personalized model")
    device = resolve_device(ST.given_options(args, ST.CLI)["device"])
    cfg = check_config(ST.PruneConfig.from_settings(ST.given_options(args, ST.PRUNE)))
    base, meta, _ = load_checkpoint(args.model)
    x = load_inputs(args.data, meta["features"])
    import sys
    import warnings

    with warnings.catch_warnings(record=True) as said:  # shown after the progress bar, not inside it
        warnings.simplefilter("always")
        mask, info = personalize(base, meta, x, cfg, args.out, device, args.compact, progress_bar("fine-prune"))
    shown = set()
    for w in said:  # each once, through the command line's one-line format
        if not issubclass(w.category, DeprecationWarning) and str(w.message) not in shown:
            shown.add(str(w.message))
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if info.adaptation.get("unlike_base"):

        from common.engine.unlike import reason
        from common.model.checkpoint import describe_input

        print(f"fineprune: warning: these inputs do not look like the ones the model was trained on "
              f"({reason(info.adaptation)}): nothing was pruned or restricted; check what the model expects "
              f"({describe_input(meta['features'])})", file=sys.stderr)
    report = {"out": str(args.out), **{k: v for k, v in asdict(info).items()
                                       if k not in ("hist", "settings", "restricted_classes")},
              "kept_classes": None if info.restricted_classes is None else  # names, as `info` shows them
              [meta["classes"][i] for i in info.restricted_classes],
              "layer_sparsity": mask.layer_sparsity(), "file_bytes": os.path.getsize(args.out)}
    if args.report:
        from common.io import atomic_write_text
        atomic_write_text(args.report, json.dumps(report, indent=2))
    return report

