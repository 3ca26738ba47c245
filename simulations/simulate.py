"""Run the federated personalization on Flower's simulation engine from Python or the console
script (`fineprune simulate --task digits --clients 4 --out DIR`), the supported way in Flower
1.42: `flwr run` of this app against Flower's own local SuperLink in simulation mode, which it
starts when none answers (runtime dependency installation off: this environment has them)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.federation import merged_config

APP_DIR = Path(__file__).resolve().parents[1]
RUN_ID = re.compile(r"started run (\d+)")  # the Flower app: pyproject.toml with [tool.flwr.app]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def simulate(overrides: dict, backend_cpus: int = 1, verbose: bool = False, timeout: float | None = None) -> dict:
    """Returns the report dict (also written to <out-dir>/report.json)."""
    if importlib.util.find_spec("ray") is None:  # Flower's simulation engine runs on it
        raise ValueError("fineprune simulate needs Flower's simulation engine (Ray): pip install -e '.[simulation]'")
    if not (APP_DIR / "pyproject.toml").is_file():
        raise ValueError(f"fineprune simulate runs the Flower app of a source checkout; {APP_DIR} has no pyproject.toml")
    cfg = merged_config({}, overrides)  # fail fast on bad keys, before anything starts
    from common.protocol import check_partition

    check_partition(cfg)  # and on data that cannot give every client some
    out = Path(cfg["out-dir"]).expanduser().resolve()
    overrides = dict(overrides, **{"out-dir": str(out)})
    bindir = str(Path(sys.executable).parent)  # Flower starts flower-superlink and its helpers by name
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
               RAY_DEDUP_LOGS="0", PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
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
    while proc.poll() is None:
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

