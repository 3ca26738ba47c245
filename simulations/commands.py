"""Experiment commands of `fineprune`: a federation on Flower's simulation engine, the benchmark
and the large-model engine benchmark."""
from __future__ import annotations


def add_parser(sub, name: str, text: str):
    if name == "simulate":
        from common.data.tasks import TASKS

        sm = sub.add_parser(name, help=text, description=text)
        sm.add_argument("--task", default="digits", help=f"one of: {', '.join(TASKS)} (default digits)")
        sm.add_argument("--clients", type=int, default=10, help="number of simulated devices (default 10)")
        sm.add_argument("--out", help="directory for report.json, report.md, plots, device storage "
                        "(default: ~/fineprune-runs/<time>)")
        sm.add_argument("--data", help="dataset directory (fsdd, speechcommands, imagefolder)")
        sm.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any run-config key of pyproject.toml, e.g. --set summary-level=bitmap")
        sm.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs as they come")
        sm.add_argument("--json", action="store_true", help="print the run's outcome as JSON instead of the summary")
        sm.set_defaults(func=cmd_simulate)
    elif name == "bench":
        from simulations import bench

        bench.build_parser(sub.add_parser(name, help=text, description=text)).set_defaults(func=bench.main)
    elif name == "bench-scale":
        from simulations import scale

        scale.build_parser(sub.add_parser(name, help=text, description=text)).set_defaults(func=scale.main)
    elif name == "bench-federation":
        from simulations import bench_federation

        bench_federation.build_parser(sub.add_parser(name, help=text, description=text)).set_defaults(
            func=bench_federation.main)
    elif name == "bench-cost":
        from simulations import bench_cost

        bench_cost.build_parser(sub.add_parser(name, help=text, description=text)).set_defaults(func=bench_cost.main)
    else:
        from simulations import bench_gpu

        bench_gpu.build_parser(sub.add_parser(name, help=text, description=text)).set_defaults(func=bench_gpu.main)


def cmd_simulate(args) -> dict:
    import sys

    from common.cli import RunFailed, progress_bar
    from common.wire.federation import default_out_dir
    from server.report import run_summary
    from simulations.simulate import simulate

    out = args.out or str(default_out_dir())
    overrides = {"task": args.task, "num-clients": args.clients, "out-dir": out}
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    if args.data:
        overrides["data-path"] = args.data
    bar = None if args.verbose else progress_bar("devices personalized")
    print(f"fineprune: a federation of {args.clients} simulated devices ({args.task}); report in {out}",
          file=sys.stderr, flush=True)
    report = simulate(overrides, verbose=args.verbose, progress=bar)
    if not args.json:
        print(run_summary(report))
        if report.get("error"):  # the ServerApp's verdict (server_app.conclude)
            raise RunFailed(f"{report['error']} (report.md lists why)")
        return None
    a = report["analysis"] or {}
    return {"report": report["files"]["json"], "clients": len(report["clients"]),
            "failed": len(report["failed"]), "rejected": len(report["rejected"]),
            "mean_sparsity": sum(c["sparsity"] for c in report["clients"]) / max(len(report["clients"]), 1),
            "mean_pairwise_similarity": a.get("mean_pairwise_similarity"),
            "clusters": a.get("clusters") if len(a.get("clusters") or []) <= 20 else
            f"{len(a['clusters'])} clusters (report.json)",
            "wall_seconds": report["wall_seconds"]}
