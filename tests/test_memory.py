"""The memory policy (common/memory.py): with `keep`, freed memory serves the next pass without
page faults; it is refused where the C library cannot keep it, or for an unknown policy; a device
chooses its threads and policy in its own node config."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PASSES = """
import resource, sys, torch
from common.memory import set_memory, in_force
torch.set_num_threads(1)
print(set_memory(sys.argv[1]), in_force())
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(4, 3, 256, 256)  # activations of 32 MB, past glibc's largest mmap threshold
with torch.no_grad():
    for _ in range(6):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="the memory policy is glibc's malloc (Linux)")
def test_kept_memory_serves_the_next_pass_without_page_faults():
    """--memory keep: the blocks one pass frees serve the next pass, which faults in no new pages;
    with the C library's default every pass faults its activations in again (in a child process:
    the policy is the whole process's)."""
    runs = {}
    for policy in ("keep", "release"):
        out = subprocess.run([sys.executable, "-c", _PASSES, policy], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split("\n")
        assert lines[0] == f"{policy} {policy}"
        runs[policy] = [int(v) for v in lines[1:] if v]
    keep, release = runs["keep"], runs["release"]
    # 3 x 32 MB a pass: 24,576 faults in 4 KB pages, every pass (48 in huge pages where the
    # kernel always gives them); kept, none from the second pass on
    assert min(release[1:]) >= 48
    assert max(keep[2:]) * 20 < min(release[1:])


@pytest.mark.badinput
def test_memory_policy_refuses_what_it_cannot_do(monkeypatch, capsys):
    """A C library without mallopt (macOS, musl) cannot keep freed memory: asking for it is one
    clear error, never a silent no-op; 'release' always works; an unknown policy is refused, and
    only commands that do their work in-process take --memory."""
    from common import memory
    from common.cli import main as cli

    monkeypatch.setattr(memory, "_mallopt", lambda: None)
    with pytest.raises(ValueError, match="needs glibc"):
        memory.set_memory("keep")
    assert memory.set_memory("release") == "release" and memory.in_force() == "release"
    with pytest.raises(ValueError, match="must be one of release, keep"):
        memory.set_memory("auto")
    with pytest.raises(SystemExit):  # argparse: an unknown choice, and simulate's clients run in Ray
        cli(["simulate", "--memory", "keep", "--out", "x"])
    assert "--memory" in capsys.readouterr().err
    assert cli(["bench-cost", "--workloads", "vgg", "--memory", "keep", "--out", "x"]) == 2
    assert "needs glibc" in capsys.readouterr().err


def test_a_device_chooses_its_threads_and_memory_policy_in_its_node_config(monkeypatch):
    """A real device's SuperNode node config sets the ClientApp process's thread count and
    memory policy; a policy the device cannot have is an error, not a silent default."""
    import torch

    from client import client_app
    from common import memory

    chosen = []
    monkeypatch.setattr(client_app, "set_memory", chosen.append)
    before = torch.get_num_threads()
    try:
        client_app.device_choices({"threads": 1, "memory": "keep", "device-name": "phone-1"})
        assert chosen == ["keep"] and torch.get_num_threads() == 1
        client_app.device_choices({"device-name": "phone-2"})  # nothing asked: nothing changed
        assert chosen == ["keep"]
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(client_app, "set_memory", memory.set_memory)
    with pytest.raises(ValueError, match="must be one of release, keep"):
        client_app.device_choices({"memory": "all"})
