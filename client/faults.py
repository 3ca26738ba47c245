"""Fault injection for resilience tests, on the device's side only: which fault (a crash, or a
stall after the model arrived) a device plays, from its own node config or, for simulated
devices, from the simulation's environment. Nothing the server sends can ask for one."""
from __future__ import annotations

import os

FAULT_ENV = "FINEPRUNE_FAULTS"  # simulation: e.g. "crash=2;stall=1,3" (partition ids)
FAULTS = ("crash", "stall")


def fault_spec(faults: dict) -> str:
    """FAULT_ENV's value for {kind: [partition ids]}."""
    bad = [k for k in faults if k not in FAULTS]
    if bad:
        raise ValueError(f"unknown fault '{bad[0]}' (choose from: {', '.join(FAULTS)})")
    return ";".join(f"{k}={','.join(str(i) for i in ids)}" for k, ids in faults.items())


def injected_fault(node_config, pid: int | None) -> str | None:
    """Fault injection for resilience tests, decided where the device runs and never by the
    server (a server that could make devices hang could stall a federation): a real device's own
    node config (fault='crash' or 'stall'), a simulated one from FAULT_ENV in the environment
    the simulation runs in."""
    if pid is None:
        fault = node_config.get("fault")
        return str(fault) if fault in FAULTS else None
    for part in os.environ.get(FAULT_ENV, "").split(";"):
        kind, _, ids = part.partition("=")
        if kind.strip() in FAULTS and str(pid) in [i.strip() for i in ids.split(",")]:
            return kind.strip()
    return None
