"""The SuperLink's public face: devices reach the Fleet API and nothing else.

Flower 1.42 serves its Fleet (devices), Control (`flwr run`, `flwr supernode register`) and
Runtime APIs from one HTTPS port, and its open-source build has no authentication for the Control
API. Whoever reaches that port can register a node key or start a run. So the SuperLink listens on
loopback only, and this gateway is what the network sees: it forwards `POST /v1/fleet/...` (and the
health check) to the SuperLink over TLS, and answers everything else 403 without forwarding it.
The operator runs `flwr run` on the server itself (or through an SSH tunnel to loopback).

It is a filter, not a federation layer: requests and replies pass through unchanged (SuperNode
authentication headers included). Any reverse proxy can do the same job (README: an nginx
`location /v1/fleet/` block); this one ships so that the recipe and its test need nothing else.

    python -m server.gateway --listen 0.0.0.0:9092 --upstream 127.0.0.1:9093 \
        --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key --upstream-ca certs/ca.crt
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys

from common.cli import first_sentence

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_EXACT = ("/health", "/v1/health")
MAX_BODY = 512 << 20  # a ResNet50 base is ~100 MB; anything far above is not a Fleet message
# what one connection, one client address and everyone together may hold open (slowloris: 1,007
# half-sent requests filled the file descriptors, and a device's request then failed)
LIMITS = {"header_seconds": 10.0, "body_idle_seconds": 15.0, "connections": 512, "per_client": 32}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}


def allowed(method: str, path: str) -> bool:
    if ".." in path or "//" in path or "%" in path:  # no encoded or dotted detours past the prefix
        return False
    if path in ALLOWED_EXACT:
        return method in ("GET", "POST")
    return method == "POST" and path.startswith(ALLOWED_PREFIXES)


async def _bounded_body(request, idle_seconds: float):
    """The request's body, read chunk by chunk: None as soon as it is declared or grows past
    MAX_BODY (a 700 MB body took the gateway from 43 MB to 1,380 MB before it said 413), False
    where the client stops sending for idle_seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        return None
    chunks, size, stream = [], 0, request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_seconds)
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            return False
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)


def guarded_protocol(limits: dict):
    """uvicorn's HTTP/1.1 protocol with the caps it lacks: a connection beyond the global or the
    per-address cap is closed at once, and one whose request headers are not complete within
    header_seconds (of opening, or of its last response) is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_host = collections.Counter()

    class Guarded(H11Protocol):
        _host = None
        _timer = None

        def connection_made(self, transport):
            host = (transport.get_extra_info("peername") or ("?",))[0]
            if len(self.connections) >= limits["connections"] or per_host[host] >= limits["per_client"]:
                transport.abort()
                return
            self._host = host
            per_host[host] += 1
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._timer = self.loop.call_later(limits["header_seconds"], self._headers_too_slow)

        def _headers_too_slow(self):
            if self.cycle is None or self.cycle.response_complete:  # no request under way: headers unfinished
                self.transport.abort()

        def on_response_complete(self):
            super().on_response_complete()
            if self._timer is not None:
                self._timer.cancel()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            if self._host is None:
                return  # refused at the door
            per_host[self._host] -= 1
            if per_host[self._host] <= 0:
                del per_host[self._host]
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return Guarded


def make_app(upstream: str, upstream_ca: str | None, limits: dict | None = None, scheme: str = "https"):
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    limits = {**LIMITS, **(limits or {})}
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=upstream_ca or True, timeout=None)
    counts = {"forwarded": 0, "refused": 0}

    async def relay(request: Request):
        raw = request.scope.get("raw_path")  # as sent: undecoded, so %2e%2e cannot slip past
        path = raw.decode("latin-1") if raw else request.url.path
        if not allowed(request.method, path):
            counts["refused"] += 1
            print(f"gateway: refused {request.method} {path[:120]!r} from "
                  f"{request.client.host if request.client else '?'}", file=sys.stderr, flush=True)
            return PlainTextResponse("only the Fleet API is served here\n", status_code=403)
        body = await _bounded_body(request, limits["body_idle_seconds"])
        if body is None:
            counts["refused"] += 1
            return PlainTextResponse("request too large\n", status_code=413, headers={"connection": "close"})
        if body is False:
            counts["refused"] += 1
            return PlainTextResponse("request body too slow\n", status_code=408, headers={"connection": "close"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        r = await client.request(request.method, path, params=request.query_params, content=body,
                                 headers=headers)
        counts["forwarded"] += 1
        return Response(r.content, status_code=r.status_code,
                        headers={k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP})

    app = Starlette(routes=[Route("/{path:path}", relay, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])])
    app.state.counts = counts
    return app


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"gateway: error: {what} must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.gateway", description=first_sentence(__doc__))
    p.add_argument("--listen", required=True, help="public HOST:PORT the devices connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--ssl-certfile", required=True, help="server certificate (PEM) the devices verify")
    p.add_argument("--ssl-keyfile", required=True, help="its private key")
    p.add_argument("--upstream-ca", help="CA that signed the SuperLink's certificate (default: system CAs)")
    a = p.parse_args(argv)
    import uvicorn

    host, port = _host_port(a.listen, "--listen")
    _host_port(a.upstream, "--upstream")
    uvicorn.run(make_app(a.upstream, a.upstream_ca), host=host, port=port, ssl_certfile=a.ssl_certfile,
                ssl_keyfile=a.ssl_keyfile, log_level="warning", http=guarded_protocol(LIMITS),
                timeout_keep_alive=5)


if __name__ == "__main__":
    main()
