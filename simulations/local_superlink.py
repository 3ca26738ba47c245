"""Start a local SuperLink in simulation mode for `flwr run .`, using the packages already
installed in this environment. Flower 1.42's own managed local SuperLink installs every app's
dependencies afresh with `uv sync` per run (several GB of torch here); this one does not.
It listens where `flwr run .`'s default `local` connection looks, so plain `flwr run .` uses it.

    python -m simulations.local_superlink start [--supernodes 10]
    python -m simulations.local_superlink stop
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS, LOCAL_SUPERLINK_HTTP_API_PORT
from flwr.supercore.utils import get_flwr_home

PID_FILE = get_flwr_home() / "local-superlink" / "fineprune-superlink.pid"


def _healthy() -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health", timeout=1).is_success
    except httpx.HTTPError:
        return False


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def _ours() -> bool:
    """Whether the SuperLink this helper started (the PID file's process) is still alive."""
    try:
        os.kill(int(PID_FILE.read_text()), 0)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False


def start(supernodes: int) -> None:
    if _healthy() and not _ours():
        # someone else's SuperLink (Flower's managed one, another user's) answers on this port:
        # reusing it silently would run our app with its settings and dependencies
        sys.exit(f"a SuperLink this helper did not start is listening on 127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}; "
                 "stop it first (or run `flwr run .` against it knowingly)")
    if not _healthy():
        log = PID_FILE.parent / "superlink.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--disable-runtime-dependency-installation", "--control-api-address", LOCAL_CONTROL_API_ADDRESS,
               "--host", "127.0.0.1", "--port", str(LOCAL_SUPERLINK_HTTP_API_PORT),
               "--database", str(PID_FILE.parent / "state.db"), "--log-file", str(log)]
        # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: this venv comes first
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = dict(os.environ, FLWR_DISABLE_UPDATE_CHECK="1", PATH=path)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        PID_FILE.write_text(str(proc.pid))
        deadline = time.time() + 60
        while not _healthy():
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"local SuperLink did not start; see {log}")
            time.sleep(0.5)
        print(f"local SuperLink started (pid {proc.pid}, log {log})")
    subprocess.run([_bin("flwr"), "federation", "simulation-config", "--num-supernodes", str(supernodes),
                    "--client-resources-num-cpus", "1"], check=True, stdout=subprocess.DEVNULL)
    print(f"simulation federation: {supernodes} supernodes; now run `flwr run . --stream`")


def stop() -> None:
    if PID_FILE.exists():
        try:
            os.killpg(int(PID_FILE.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass
        PID_FILE.unlink()
        print("local SuperLink stopped")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("--supernodes", type=int, default=10)
    a = p.parse_args(argv)
    start(a.supernodes) if a.action == "start" else stop()


if __name__ == "__main__":
    main()
