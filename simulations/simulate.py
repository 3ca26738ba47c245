"""Run the federated personalization on Flower's simulation engine from Python or the console
script (`fineprune simulate --task digits --clients 4 --out DIR`), the supported way in Flower
1.42: `flwr run` of this app against a local SuperLink in simulation mode (runtime dependency
installation off: this environment has them). The SuperLink is this run's own, on free loopback
ports, and is stopped when the run ends: it never serves another user's run, and nothing of it
outlives the command."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from client.faults import FAULT_ENV, fault_spec
from common.wire.federation import merged_config

APP_DIR = Path(__file__).resolve().parents[1]
RUN_ID = re.compile(r"started run (\d+)")  # the Flower app: pyproject.toml with [tool.flwr.app]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSuperLink:
    """Flower's own `flower-superlink` in simulation mode, started as `flwr run` starts its local
    one, but on free ports and owned by this process: `stop` ends it and what it started."""

    def __init__(self, home: Path, env: dict, bindir: str):
        self.http, self.control, self.fleet = free_port(), free_port(), free_port()
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / "superlink.log"
        self.env = dict(env, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(self.http),
                        FLWR_LOCAL_CONTROL_API_PORT=str(self.control))
        cmd = [os.path.join(bindir, "flower-superlink"), "--insecure", "--simulation",
               "--isolation", "subprocess", "--control-api-address", f"127.0.0.1:{self.control}",
               "--fleet-api-address", f"127.0.0.1:{self.fleet}", "--host", "127.0.0.1", "--port", str(self.http),
               "--log-file", str(self.log), "--database", str(home / "state.db")]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + 60
        while not self._healthy():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the local SuperLink did not start; see {self.log}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.http}/health", timeout=0.4).is_success
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM to the SuperLink's process group (it and the simulation it runs), SIGKILL after 15 s."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # helpers in the group that outlived the leader (the simulation process, Ray)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def simulate(overrides: dict, backend_cpus: int = 1, verbose: bool = False, timeout: float | None = None,
             progress=None, faults: dict | None = None) -> dict:
    """Returns the report dict (also written to <out-dir>/report.json). `progress(done, total)`, if
    given, hears how many simulated devices have personalized so far. `faults`, for resilience
    tests: {"crash" or "stall": [partition ids]}, set in the simulation's environment (the devices'
    side), never in the run config the server sends."""
    if importlib.util.find_spec("ray") is None:  # Flower's simulation engine runs on it
        raise ValueError("fineprune simulate needs Flower's simulation engine (Ray): pip install -e '.[simulation]'")
    if not (APP_DIR / "pyproject.toml").is_file():
        raise ValueError(f"fineprune simulate runs the Flower app of a source checkout; {APP_DIR} has no pyproject.toml")
    cfg = merged_config({}, overrides)  # fail fast on bad keys, before anything starts
    from common.data.protocol import check_partition

    check_partition(cfg)  # and on data that cannot give every client some
    out = Path(cfg["out-dir"]).expanduser().resolve()
    overrides = dict(overrides, **{"out-dir": str(out)})
    bindir = str(Path(sys.executable).parent)  # Flower starts flower-superlink and its helpers by name
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_DEDUP_LOGS="0", PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop(FAULT_ENV, None)
    if faults:
        env[FAULT_ENV] = fault_spec(faults)
    link = LocalSuperLink(out / "superlink", env, bindir)
    try:
        return _run(cfg, overrides, out, link.env, bindir, backend_cpus, verbose, timeout, progress)
    finally:
        link.stop()


def _run(cfg, overrides, out, env, bindir, backend_cpus, verbose, timeout, progress) -> dict:
    cmd = [os.path.join(bindir, "flwr"), "run", str(APP_DIR), "--stream",
           "--federation-config", f"num-supernodes={cfg['num-clients']}",
           "--federation-config", f"client-resources-num-cpus={backend_cpus}",
           "--federation-config", f"init-args-log-to-driver={_toml(verbose)}"]
    for k, v in overrides.items():
        cmd += ["--run-config", f"{k}={_toml(v)}"]
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=APP_DIR, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=_collect, args=(proc, lines, verbose), daemon=True)
    reader.start()
    path = out / "report.json"
    shown = -1
    while proc.poll() is None:
        if progress is not None and (done := _personalized(out, started)) != shown:
            shown = done
            progress(done, int(cfg["num-clients"]))
        if timeout is not None and time.time() - started > timeout:
            _stop(proc, lines, env)
            raise RuntimeError(f"the simulation did not finish within {timeout:g} s")
        if _finished(path, started):
            # The ServerApp wrote its last report; a stalled client may still hold the simulation
            # open (it sleeps in its worker): the run is over, so stop it rather than wait for it.
            try:
                proc.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _stop(proc, lines, env)
            break
        time.sleep(0.5)
    reader.join(timeout=5)
    if progress is not None:
        progress(_personalized(out, started), int(cfg["num-clients"]))
    if not _finished(path, started):
        tail = "" if verbose else "".join(lines[-20:])
        raise RuntimeError(f"the simulation ended (flwr run exit {proc.returncode}) without writing {path}\n{tail}")
    return json.loads(path.read_text())


GRACE_SECONDS = 10.0


def _collect(proc, lines: list, echo: bool) -> None:
    for line in proc.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)


def _personalized(out: Path, since: float) -> int:
    """Simulated devices whose personalized model was written during this run."""
    n = 0
    for f in (out / "devices").glob("node-*/personal.pt"):
        try:
            n += f.stat().st_mtime >= since
        except OSError:
            pass
    return n


def _finished(path: Path, since: float) -> bool:
    """The run's final report is there: written after `since` and marked finished."""
    try:
        return path.stat().st_mtime >= since and bool(json.loads(path.read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def _stop(proc, lines: list, env: dict) -> None:
    """End the run on the SuperLink (`flwr stop`), then the `flwr run` that streams it."""
    found = [m.group(1) for line in lines for m in [RUN_ID.search(line)] if m]
    if found:
        subprocess.run([os.path.join(os.path.dirname(proc.args[0]), "flwr"), "stop", found[0]], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()

