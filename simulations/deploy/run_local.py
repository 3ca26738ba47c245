"""A real deployment on one machine: a SuperLink and N SuperNodes as separate processes talking
over TLS on loopback (Flower 1.42's Fleet API is HTTPS; earlier releases used gRPC), then `flwr run`
of the operator-signed app. Used by the deployment test and as a how-to. The security layout:

- the SuperLink listens on loopback only; devices reach it through the Fleet-only gateway
  (server/gateway.py), so the Control API (`flwr run`, `flwr supernode register`) is reachable
  only from the server itself;
- SuperNode authentication on: only public keys the operator registered may join;
- the SuperLink is fineprune-superlink (server/guard.py): a ServerApp runs only if the operator
  signed it, so an unsigned run started through the Control API never runs on the server;
- every device runs its ClientApps through fineprune-superexec (client/guard.py): only apps
  signed with the operator's Ed25519 key (`fineprune sign-app`) are installed and run, and only
  that executor (holding the SuperNode's SuperExec secret) takes the device's tasks;
- each SuperNode has its own device storage and data directory.

    python -m simulations.deploy.run_local --out /tmp/deploy --supernodes 2
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.cli import first_sentence
from common.io import atomic_write_bytes
from common.wire.appsign import make_signing_key, sign_app
from simulations.deploy.certs import make_certs, make_node_key
from simulations.simulate import free_port

APP_DIR = Path(__file__).resolve().parents[2]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def export_digits_users(out: Path, n: int, seed: int = 0) -> list[Path]:
    """Each device's own unlabeled photos (PNG), cut from the users' pool as in simulation."""
    from PIL import Image

    from common.data.protocol import simulated_user
    from common.wire.federation import merged_config

    cfg = merged_config({}, {"seed": seed})
    dirs = []
    for pid in range(n):
        user = simulated_user(cfg, pid, n)
        d = out / f"supernode-{pid}" / "data"
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(user.unlabeled):
            Image.fromarray((img[0].numpy() * 255).round().astype("uint8")).save(d / f"img{i:04d}.png")
        dirs.append(d)
    return dirs


class Deployment:
    """SuperLink + SuperNodes as real processes. With `auth` (the default) the SuperLink admits only
    SuperNodes whose public keys were registered with `flwr supernode register`; `intruders` more
    SuperNodes try to join with keys nobody registered. `faults`: {node name: "crash" or "stall"},
    for resilience tests, in that device's own node config (the server cannot ask for one)."""

    def __init__(self, out: Path, data_dirs: list[Path], auth: bool = True, intruders: int = 0,
                 signed: bool = True, rogue_executor: bool = False, faults: dict | None = None):
        self.signed, self.rogue_executor, self.appio = signed, rogue_executor, {}
        self.faults = faults or {}
        self.out = out
        self.data_dirs = data_dirs
        self.auth = auth
        self.intruders = intruders
        self.procs: dict[str, subprocess.Popen] = {}
        # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: this venv comes first
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = dict(os.environ, FLWR_HOME=str(out / "flwr-home"), FLWR_DISABLE_UPDATE_CHECK="1", PATH=path)

    def _spawn(self, name: str, cmd: list[str]):
        log = open(self.out / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def log(self, name: str) -> str:
        return (self.out / f"{name}.log").read_text(errors="replace")

    def start(self):
        certs = self.certs = make_certs(self.out / "certs")
        # Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port, the Control API
        # without authentication: that port stays on loopback, the devices get the gateway's
        self.port, self.public_port = free_port(), free_port()
        if self.signed:  # the operator signs elsewhere; the server holds only the public key
            self.operator_key = make_signing_key(self.out / "operator-key", "operator")
        guard = (["fineprune-superlink", "--trusted-keys", str(self.operator_key["public"]),
                  "--app-state", str(self.out / "server-app-serials.json")] if self.signed else ["flower-superlink"])
        self._spawn("superlink", [
            _bin(guard[0]), *guard[1:], "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
            "--ssl-keyfile", str(certs["key"]), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--database", str(self.out / "state.db"),
            *(["--enable-supernode-auth"] if self.auth else [])])
        home = self.out / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{certs["ca"]}"\n\n'
            f'[superlink.public]\naddress = "127.0.0.1:{self.public_port}"\nroot-certificates = "{certs["ca"]}"\n')
        self._wait_for_superlink()
        self.replace_gateway([sys.executable, "-m", "server.gateway"])
        if self.signed:
            self.app = Path(sign_app(APP_DIR, self.operator_key["private"], self.out / "signed-app")["app"])
        else:
            self.app = APP_DIR
        nodes = [(f"supernode-{i}", data, True) for i, data in enumerate(self.data_dirs)]
        nodes += [(f"intruder-{i}", self.data_dirs[0], False) for i in range(self.intruders)]
        for name, data, registered in nodes:
            auth_args = []
            if self.auth:
                keys = make_node_key(self.out / "node-keys", name)
                if registered:
                    self.register(keys["public"])
                auth_args = ["--auth-supernode-private-key", str(keys["private"])]
            device = self.out / name / "device"
            appio = free_port()
            self.appio[name] = appio
            secret = self.out / "node-keys" / f"{name}.exec-secret"
            if self.signed:  # shared by the SuperNode and its guarded executor only (0600)
                secret.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(secret, secrets.token_bytes(32), private=True)
            self._spawn(name, [
                _bin("flower-supernode"), "--root-certificates", str(certs["ca"]),
                "--superlink", f"127.0.0.1:{self.public_port}", "--host", "127.0.0.1", "--port", str(appio),
                *(["--isolation", "process", "--superexec-auth-secret-file", str(secret)] if self.signed else []),
                *auth_args, "--node-config", f"device-dir='{device}' data-dir='{data}' device-name='{name}'"
                + (f" fault='{self.faults[name]}'" if name in self.faults else "")])
            if self.signed:  # the device's own executor: it runs only apps signed with this key
                self._spawn(f"{name}-exec", [
                    _bin("fineprune-superexec"), "--trusted-keys", str(self.operator_key["public"]),
                    "--superexec-auth-secret-file", str(secret), "--app-state", str(device / "app-serials.json"),
                    "--insecure", "--runtime-api-address", f"127.0.0.1:{appio}"])
        if self.signed and self.rogue_executor:
            # a local process without the secret that reaches supernode-0's runtime API with Flower's
            # own, unguarded executor: it must never get a task
            self._spawn("rogue-exec", [_bin("flower-superexec"), "--insecure", "--plugin-type", "clientapp",
                                       "--runtime-api-address", f"127.0.0.1:{self.appio['supernode-0']}"])
        time.sleep(3)
        for name in (n for n, _, reg in nodes if reg):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited early (code {self.procs[name].returncode}); see {self.out}/{name}.log")

    def _wait_for_superlink(self, seconds: float = 60):
        self._wait_for_port(self.port, "superlink", seconds)

    def _wait_for_port(self, port: int, name: str, seconds: float = 60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited (code {self.procs[name].returncode}); see {self.out}/{name}.log")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{name} did not listen on port {port} within {seconds:.0f} s")

    def flwr(self, *args: str, federation: str = "deploy", timeout: float = 120) -> subprocess.CompletedProcess:
        """Flower's CLI against a federation of ~/.flwr/config.toml: `deploy` is the SuperLink on
        loopback (the operator, on the server), `public` the address devices use (the gateway)."""
        return subprocess.run([_bin("flwr"), *args, federation], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, public_key: Path):
        """Register a SuperNode's public key with the SuperLink (Flower's own CLI, over TLS)."""
        for _ in range(20):  # the Control API may need a moment after the port opens
            r = self.flwr("supernode", "register", str(public_key))
            if r.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"could not register {public_key}: {r.stdout[-500:]} {r.stderr[-500:]}")

    def launch(self, run_config: str, name: str = "server") -> subprocess.Popen:
        """Start `flwr run` of the (signed) app against the SuperLink, its report in out/`name` and
        its output in out/flwr-run-`name`.log; `wait` collects the report."""
        cmd = [_bin("flwr"), "run", str(self.app), "deploy", "--stream", "-c",
               f"out-dir='{self.out / name}' {run_config}"]
        log = self.out / ("flwr-run.log" if name == "server" else f"flwr-run-{name}.log")
        return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=self.env)

    def wait(self, run: subprocess.Popen, timeout: float = 600, name: str = "server") -> dict:
        report = self.out / name / "report.json"
        try:
            run.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.kill()
        deadline = time.time() + 60
        while not report.exists() and time.time() < deadline:  # the stream may end before the file lands
            time.sleep(1)
        if not report.exists():
            raise RuntimeError(f"no report at {report}; see {self.out}/flwr-run.log and the process logs")
        return json.loads(report.read_text())

    def run(self, run_config: str, timeout: float = 600) -> dict:
        return self.wait(self.launch(run_config), timeout)

    def replace_gateway(self, command: list[str], name: str = "gateway"):
        """(Re)start what the devices reach at the public address: `command` (the gateway's module,
        or a test's stand-in for a malicious SuperLink, logged as `name`) with the gateway's options."""
        old = getattr(self, "front", None)
        if old is not None and self.procs[old].poll() is None:
            self.procs[old].terminate()
            self.procs[old].wait(timeout=15)
        certs = self.certs
        self._spawn(name, [*command, "--listen", f"127.0.0.1:{self.public_port}",
                           "--upstream", f"127.0.0.1:{self.port}", "--ssl-certfile", str(certs["cert"]),
                           "--ssl-keyfile", str(certs["key"]), "--upstream-ca", str(certs["ca"])])
        self.front = name
        self._wait_for_port(self.public_port, name)

    def kill(self, name: str):
        """Pull the plug on one process (a SuperNode and the ClientApp it runs): no goodbye."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def main(argv=None):
    p = argparse.ArgumentParser(description=first_sentence(__doc__))
    p.add_argument("--out", required=True, help="working directory (certificates, device storage, logs, report)")
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--data-dir", action="append", help="a device's data directory (once per SuperNode); "
                   "default: each device gets digits photos from the users' pool")
    p.add_argument("--run-config", default="", help="extra run config, e.g. \"summary-level='bitmap'\"")
    p.add_argument("--no-auth", action="store_true", help="let any SuperNode join (no key registration)")
    p.add_argument("--unsigned", action="store_true",
                   help="devices run any app (Flower's default executor) instead of only operator-signed ones")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dirs = [Path(d).resolve() for d in a.data_dir] if a.data_dir else export_digits_users(out, a.supernodes)
    dep = Deployment(out, dirs, auth=not a.no_auth, signed=not a.unsigned)
    try:
        dep.start()
        n = len(dirs)
        report = dep.run(f"num-clients={n} min-clients={n} research-accuracy=false {a.run_config}")
    finally:
        dep.stop()
    print(json.dumps({"report": str(out / "server" / "report.json"), "clients": len(report["clients"]),
                      "failed": len(report["failed"]), "rejected": len(report["rejected"])}, indent=2))
    if not report["clients"]:
        print("run_local: error: no device did the work (see the failed and rejected reasons in report.md)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
