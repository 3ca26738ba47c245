"""A real deployment on one machine: a SuperLink and N SuperNodes as separate processes talking
over TLS on loopback (Flower 1.42's Fleet API is HTTPS; earlier releases used gRPC), each
SuperNode with its own device storage and data directory, then `flwr run` against the SuperLink. Used by the deployment test and as a how-to.

    python -m simulations.deploy.run_local --out /tmp/deploy --supernodes 2
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from simulations.deploy.certs import make_certs

APP_DIR = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def export_digits_users(out: Path, n: int, seed: int = 0) -> list[Path]:
    """Each device's own unlabeled photos (PNG), cut from the users' pool as in simulation."""
    from PIL import Image

    from common.federation import merged_config, simulated_user

    cfg = merged_config({}, {"seed": seed})
    dirs = []
    for pid in range(n):
        user = simulated_user(cfg, pid, n)
        d = out / f"node-{pid}" / "data"
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(user.unlabeled):
            Image.fromarray((img[0].numpy() * 255).round().astype("uint8")).save(d / f"img{i:04d}.png")
        dirs.append(d)
    return dirs


class Deployment:
    def __init__(self, out: Path, data_dirs: list[Path]):
        self.out = out
        self.data_dirs = data_dirs
        self.procs: list[subprocess.Popen] = []
        # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: this venv comes first
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = dict(os.environ, FLWR_HOME=str(out / "flwr-home"), FLWR_DISABLE_UPDATE_CHECK="1", PATH=path)

    def _spawn(self, name: str, cmd: list[str]):
        log = open(self.out / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self):
        certs = make_certs(self.out / "certs")
        # Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTPS port
        self.port = free_port()
        self._spawn("superlink", [
            _bin("flower-superlink"), "--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
            "--ssl-keyfile", str(certs["key"]), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation", "--database", str(self.out / "state.db")])
        for i, data in enumerate(self.data_dirs):
            device = self.out / f"node-{i}" / "device"
            self._spawn(f"supernode-{i}", [
                _bin("flower-supernode"), "--root-certificates", str(certs["ca"]),
                "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"device-dir='{device}' data-dir='{data}' device-name='node-{i}'"])
        home = self.out / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{certs["ca"]}"\n')
        time.sleep(3)
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a Flower process exited early (code {p.returncode}); logs in {self.out}")

    def run(self, run_config: str, timeout: float = 600) -> dict:
        report = self.out / "server" / "report.json"
        cmd = [_bin("flwr"), "run", str(APP_DIR), "deploy", "--stream", "-c",
               f"out-dir='{self.out / 'server'}' {run_config}"]
        with open(self.out / "flwr-run.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, timeout=timeout, check=False)
        deadline = time.time() + 60
        while not report.exists() and time.time() < deadline:  # the stream may end before the file lands
            time.sleep(1)
        if not report.exists():
            raise RuntimeError(f"no report at {report}; see {self.out}/flwr-run.log and the process logs")
        return json.loads(report.read_text())

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="working directory (certificates, device storage, logs, report)")
    p.add_argument("--supernodes", type=int, default=2)
    p.add_argument("--data-dir", action="append", help="a device's data directory (once per SuperNode); "
                   "default: each device gets digits photos from the users' pool")
    p.add_argument("--run-config", default="", help="extra run config, e.g. \"summary-level='bitmap'\"")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dirs = [Path(d).resolve() for d in a.data_dir] if a.data_dir else export_digits_users(out, a.supernodes)
    dep = Deployment(out, dirs)
    try:
        dep.start()
        n = len(dirs)
        report = dep.run(f"num-clients={n} min-clients={n} research-accuracy=false {a.run_config}")
    finally:
        dep.stop()
    print(json.dumps({"report": str(out / "server" / "report.json"), "clients": len(report["clients"]),
                      "failed": len(report["failed"]), "rejected": len(report["rejected"])}, indent=2))


if __name__ == "__main__":
    main()
