"""The gateway under load, on loopback: it refuses an oversized body before reading it, caps what
one address and everyone may hold open, and closes connections whose headers never finish, so a
device's request still gets through (bounded loops, a few seconds)."""
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.security


def _serve(app, **kw):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", **kw))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    return server, sock.getsockname()[1]


@pytest.fixture(scope="module")
def gateway():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from server.gateway import guarded_protocol, make_app

    upstream_app = Starlette(routes=[Route("/health", lambda r: PlainTextResponse("ok"), methods=["GET"])])
    up, up_port = _serve(upstream_app)
    limits = {"header_seconds": 1.0, "body_idle_seconds": 1.0, "connections": 30, "per_client": 5}
    gw, port = _serve(make_app(f"127.0.0.1:{up_port}", None, limits, scheme="http"), http=guarded_protocol(limits))
    yield port
    gw.should_exit = up.should_exit = True


def _request(port, raw: bytes, source="127.0.0.1", timeout=3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(raw)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_an_oversized_body_is_refused_before_it_is_read(gateway):
    """Before: the gateway read the whole 700 MB body (43 -> 1,380 MB resident), then said 413."""
    t = time.perf_counter()
    reply = _request(gateway, b"POST /v1/fleet/push HTTP/1.1\r\nHost: x\r\nContent-Length: 734003200\r\n\r\nabc")
    assert reply.startswith(b"HTTP/1.1 413") and time.perf_counter() - t < 2.5


def test_a_body_that_grows_past_the_limit_is_cut_off(gateway, monkeypatch):
    import server.gateway as G

    monkeypatch.setattr(G, "MAX_BODY", 64 << 10)
    head = b"POST /v1/fleet/push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (16 << 10, b"a" * (16 << 10))
    assert _request(gateway, head + chunk * 8 + b"0\r\n\r\n").startswith(b"HTTP/1.1 413")


def test_half_sent_requests_are_capped_and_closed_and_a_device_still_gets_through(gateway):
    slow = []
    for _ in range(12):  # more than one address may hold (5)
        s = socket.create_connection(("127.0.0.1", gateway), timeout=0.3)
        s.sendall(b"POST /v1/fleet/pull HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        slow.append(s)
    time.sleep(0.2)
    closed_now = sum(_closed(s) for s in slow)
    assert closed_now >= 7  # those over the per-address cap: closed at once
    # another address is not crowded out meanwhile
    assert _request(gateway, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    source="127.0.0.2").startswith(b"HTTP/1.1 200")
    time.sleep(1.3)  # past the header deadline: every half-sent request is gone
    assert all(_closed(s) for s in slow)
    for s in slow:
        s.close()
    assert _request(gateway, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_a_body_that_stops_arriving_is_dropped(gateway):
    t = time.perf_counter()
    reply = _request(gateway, b"POST /v1/fleet/push HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
    assert reply.startswith(b"HTTP/1.1 408") and time.perf_counter() - t < 2.9
