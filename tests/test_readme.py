"""The README is a guide that works as written: every command in its code blocks parses with the
flags it shows, the newcomer's path runs on a user's own files, the scorer example plugs into the
engine, the deployment block runs as written, and the layout page names every module."""
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.simulate import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def code_blocks(lang: str | None = None) -> list[str]:
    return [body for fence, body in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
            if lang is None or fence == lang]


def block_with(text: str, lang: str = "bash") -> str:
    found = [b for b in code_blocks(lang) if text in b]
    assert len(found) == 1, f"the README has {len(found)} {lang} blocks holding {text!r}"
    return found[0]


def command_lines(block: str) -> list[str]:
    lines = []
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            lines.append(line)
    return lines


def env_for(home: Path) -> dict:
    return dict(os.environ, HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                FLWR_DISABLE_UPDATE_CHECK="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore")


def expand(line: str, home: Path) -> list[str]:
    """A README line's words as the shell gives them, with `home` for ~ and $HOME."""
    return shlex.split(line.replace("~/", f"{home}/").replace("$HOME", str(home)))


def test_the_readme_starts_with_the_two_setup_commands_and_stays_a_guide():
    first = code_blocks()[0].strip().splitlines()
    assert len(first) == 2 and "fineprune simulate" in first[0] and first[1].endswith("python -m pytest")
    assert len(README.splitlines()) <= 300
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in ci  # CI runs the README's test command
    for heading in ("## Install", "## Quick start", "## On the device", "## The federation", "## A real deployment",
                    "## Security model", "## Results", "## Developing"):
        assert heading in README
    assert not re.search(r"#\d+\b|\bI (tried|have|measured)\b", README)


def test_every_fineprune_command_in_the_readme_parses_with_its_flags(tmp_path):
    """Parsed by the real command-line parser, as `fineprune CMD --help` describes it."""
    from common.cli import build_parser, parse

    seen = set()
    for block in code_blocks("bash"):
        for line in command_lines(block):
            for part in re.split(r"&&|;", line):
                words = expand(part.strip().rstrip("&").strip(), tmp_path)
                if not words:
                    continue
                if words[0].endswith("fineprune") and len(words) > 1:
                    argv = words[1:]
                    parse(build_parser(argv), argv)  # SystemExit (exit 2) on an unknown flag or value
                    seen.add(argv[0])
    assert {"simulate", "pretrain", "personalize", "evaluate", "predict", "export", "info", "keygen",
            "sign-app", "bench-scale"} <= seen, seen


def help_flags(cmd: list[str], home: Path) -> str:
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env_for(home), cwd=ROOT, timeout=120)
    assert r.returncode == 0, (cmd, r.stderr[-500:])
    return r.stdout


def test_every_other_command_in_the_readme_knows_the_flags_it_is_given(tmp_path):
    """The deployment's Flower and helper commands: each flag the README passes is in its --help."""
    checked = 0
    for block in code_blocks("bash"):
        for line in command_lines(block):
            words = expand(line.rstrip("&").strip(), tmp_path)
            if words[0] == "python" and words[1] == "-m" and words[2] != "pytest":
                cmd = [sys.executable, "-m", words[2]]
            elif words[0] in ("fineprune-superlink", "fineprune-superexec", "flower-supernode"):
                cmd = [str(BIN / words[0])]
            elif words[0] == "flwr":
                cmd = [str(BIN / "flwr"), *[w for w in words[1:3] if not w.startswith(("-", "/", "~"))
                                          and w not in ("prod",)]]
            else:
                continue
            text = help_flags(cmd, tmp_path)
            if words[0] in ("fineprune-superlink", "fineprune-superexec"):  # the rest are Flower's own options
                text += help_flags([str(BIN / words[0].replace("fineprune-", "flower-"))], tmp_path)
            for flag in (w.split("=", 1)[0] for w in words if w.startswith("--")):
                assert flag in text, f"{' '.join(cmd)} has no {flag}"
            checked += 1
    assert checked >= 8


def make_photos(folder: Path, classes=(3, 7), n: int = 30, start: int = 0) -> list[int]:
    """A user's own unlabeled photos: digits of their classes, white ink on black, as PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    picked = [i for i in range(start, len(d.target)) if d.target[i] in classes][:n]
    for k, i in enumerate(picked):
        Image.fromarray((d.images[i] / 16 * 255).round().astype("uint8")).save(folder / f"img{k:04d}.png")
    return [int(d.target[i]) for i in picked]


def test_a_newcomers_path_from_a_checkout_to_an_exported_model_works_as_written(tmp_path):
    home = tmp_path
    own = make_photos(home / "photos")
    labels = make_photos(home / "labeled-flat", start=1000)
    for k, y in enumerate(labels):  # one subfolder per class
        (home / "labeled" / str(y)).mkdir(parents=True, exist_ok=True)
        os.replace(home / "labeled-flat" / f"img{k:04d}.png", home / "labeled" / str(y) / f"img{k:04d}.png")
    block = block_with("fineprune personalize --model ~/base.pt --data ~/photos --out ~/me.pt")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True, env=env_for(home),
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("base.pt", "me.pt", "eval.png", "eval.json", "me.onnx"):
        assert (home / f).stat().st_size > 0, f
    evaluation = json.loads((home / "eval.json").read_text())
    assert evaluation["accuracy"]["model"] >= evaluation["accuracy"]["baseline"] - 0.02
    assert "confusion" in r.stdout
    answers = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"file"')]
    assert len(answers) == 2 and answers[0]["class"] == answers[1]["class"] == str(own[0])
    snippet = block_with("onnxruntime as ort", lang="python")
    s = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env_for(home),
                       cwd=home, timeout=120)
    assert s.returncode == 0, s.stderr[-2000:]
    assert s.stdout.strip() == answers[1]["class"]  # onnxruntime alone, classes from the file's metadata


def test_the_readmes_scorer_example_plugs_into_the_engine(digits, digits_base):
    import common.engine.scoring as scoring
    from common.engine.prune import fine_prune
    from common.settings import PruneConfig

    example = block_with('@register("usage-squared")', lang="python")
    try:
        exec(example, vars(scoring))
        assert "usage-squared" in scoring.SCORERS
        from common.settings import BY_NAME

        assert "usage-squared" in BY_NAME["scoring"].options()  # --scoring and the run config offer it
        res = fine_prune(digits_base, digits.x[:64], PruneConfig(scoring="usage-squared", target_sparsity=0.5))
        assert abs(res.sparsity - 0.5) < 0.05
    finally:
        scoring.SCORERS.pop("usage-squared", None)


def test_docs_layout_names_every_module():
    page = (ROOT / "docs" / "layout.md").read_text()
    missing = []
    for pkg in ("common", "client", "server", "simulations"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f.name == "__init__.py":
                continue
            rel = f.relative_to(ROOT).as_posix()
            if f"`{rel}`" not in page and not (pkg == "simulations" and f"`{f.name}`" in page):
                missing.append(rel)
    assert not missing, f"docs/layout.md does not name {missing}"


# ---- the deployment block, as written ----------------------------------------------------------

def wait_port(host: str, port: int, proc, seconds: float = 90):
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listened on {host}:{port} within {seconds} s")


def server_name() -> str:
    """A loopback address of its own, so the certificate's --host is what TLS checks."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "localhost"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.fault
def test_the_deployment_block_works_as_written(tmp_path):
    """Every line of the README's deployment block, in order, on one machine: the operator signs,
    the server makes its CA and the devices' keys (the CA untouched by them), starts the SuperLink
    and the gateway and registers two devices, each device starts its SuperNode and executor, and
    the signed run completes with both. SERVER and the ports are the only substitutions."""
    home = tmp_path
    block = block_with("# 1. the operator")
    server = server_name()
    ports = {"9092": str(free_port()), "9093": str(free_port()), "9094": str(free_port())}
    second_port = str(free_port())
    for i, d in enumerate(("phone-1", "phone-2")):
        make_photos(home / d / "photos", classes=((3, 7), (1, 4))[i], n=15)

    def subst(line: str) -> str:
        line = line.replace("SERVER", server)
        for a, b in ports.items():
            line = line.replace(a, b)
        return line

    lines = [subst(line) for line in command_lines(block)]
    device = [line for line in lines if "phone-1.secret" in line or line.startswith(("flower-supernode",
                                                                                      "fineprune-superexec"))]
    second = [line.replace("phone-1", "phone-2").replace(ports["9094"], second_port) for line in device]
    run_at = next(i for i, line in enumerate(lines) if line.startswith("flwr run"))
    lines = lines[:run_at] + second + lines[run_at:]
    env = env_for(home)
    procs, ca_hash, out = [], None, ""
    try:
        for line in lines:
            if line.endswith("&"):
                name = line.split()[0] if not line.startswith("python") else line.split()[2]
                log = open(home / f"{name}-{len(procs)}.log", "w")
                p = subprocess.Popen(["bash", "-c", line[:-1]], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
                procs.append(p)
                if "--port" in line:
                    words = line.split()
                    wait_port("127.0.0.1", int(words[words.index("--port") + 1]), p)
                elif "--listen" in line:
                    wait_port(server, int(line.split("--listen ")[1].split()[0].rsplit(":", 1)[1]), p)
                else:
                    time.sleep(2)
                continue
            tries = 30 if line.startswith("flwr supernode register") else 1
            for attempt in range(tries):
                r = subprocess.run(["bash", "-euo", "pipefail", "-c", line], env=env, cwd=ROOT, capture_output=True,
                                   text=True, timeout=600)
                if r.returncode == 0 or attempt == tries - 1:
                    break
                time.sleep(1)  # the Control API may need a moment after its port opens
            assert r.returncode == 0, f"{line}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
            if "--host" in line and "deploy.certs" in line:
                ca_hash = sha(home / "certs" / "ca.crt")
            if "--node-key" in line:
                assert sha(home / "certs" / "ca.crt") == ca_hash  # device keys never touch the CA
            if line.startswith("flwr run"):
                out = r.stdout
        report = json.loads((home / "run" / "report.json").read_text())
        assert len(report["clients"]) == 2, out[-3000:]
        assert "clients: 2 replied, 0 failed, 0 rejected" in out
        assert sorted(c["id"].split("@")[0] for c in report["clients"]) == ["phone-1", "phone-2"]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        stop_strays(home)


def stop_strays(home: Path):
    """Processes this test's commands started in sessions of their own (Flower's executors)."""
    mine = f"HOME={home}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
