"""Which plug-ins exist: the importance scores, stop rules, tasks and summary levels each live in a
registry of their own module (a scorer is one @register function in common/engine/scoring.py).
The settings table names a registry here instead of listing its entries, so a plug-in registered
in its module is a valid setting on every surface (command line, run config, engine) without
touching the table. The one place the table learns what those modules registered: by name, at
check time, so the table itself imports none of them."""
from __future__ import annotations

import importlib

HOMES = {  # registry -> (module, the dict its entries are registered in)
    "scoring": ("common.engine.scoring", "SCORERS"),
    "stop-rule": ("common.engine.stop", "RULES"),
    "task": ("common.data.tasks", "TASKS"),
    "summary-level": ("common.wire.summary", "LEVELS"),
}


class Plugins:
    """The entries of one registry, read when a value is checked or an option listed."""

    def __init__(self, name: str):
        if name not in HOMES:
            raise KeyError(f"no registry '{name}' (known: {', '.join(HOMES)})")
        self.name = name

    def __call__(self) -> tuple:
        module, attr = HOMES[self.name]
        return tuple(getattr(importlib.import_module(module), attr))
