"""One table of settings: name, type, default, help and validation of every knob, from which
every surface is derived: the run config of pyproject.toml (a test checks it matches), the keys a
ClientApp reads, the engine's PruneConfig, the resume key and the `fineprune personalize` options.
A default is written here and nowhere else. Why ~275 lines in one module: the table is one list
that a reader scans top to bottom, and the config it generates stays beside it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass

from common.registry import Plugins

AUTO = "auto"  # the spelling of "no fixed value: decide from the data" in TOML and on the command line

# where a setting is read: "run" = the ServerApp's run config, "client" = sent to every ClientApp,
# "prune" = a field of PruneConfig (the engine; also a `fineprune personalize` option), "cli" = an
# option of `fineprune personalize` that is not an engine field
RUN, CLIENT, PRUNE, CLI = "run", "client", "prune", "cli"


@dataclass(frozen=True)
class Setting:
    name: str                     # run-config key and command-line option (--name)
    default: object               # the Python value; None means AUTO
    help: str
    where: frozenset
    kind: type = None             # str, int, float or bool; from the default when not given
    choices: object = None        # a tuple of the allowed values, or a registry's Plugins (common/registry.py)
    low: float | None = None      # inclusive bounds for numbers
    high: float | None = None
    high_open: bool = False       # the upper bound itself is not allowed
    aliases: tuple = ()           # (spelling, value) pairs also accepted: a setting's former spellings

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def label(self) -> str:
        return self.name.replace("-", " ")

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    def options(self) -> tuple | None:
        return self.choices() if callable(self.choices) else self.choices

    def parse(self, value):
        """A value from TOML, a command line or a wire -> the checked Python value."""
        if self.default is None and (value is None or str(value).strip().lower() in (AUTO, "")):
            return None
        value = dict(self.aliases).get(str(value).strip().lower(), value)
        t = self.type
        try:
            if t is bool:
                v = _as_bool(value)
            elif t is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            else:
                v = t(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.label} must be {t.__name__}, got {value!r}") from None
        return self.check(v)

    def check(self, v):
        if v is None and self.default is None:
            return v
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{self.label} must be a finite number, got {v}")
        opts = self.options()
        if opts is not None and v not in opts:
            raise ValueError(f"unknown {self.label} '{v}' (choose from: {', '.join(map(str, opts))})")
        if self.low is not None and v < self.low:
            raise ValueError(f"{self.label} must be >= {self.low}, got {v}")
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            raise ValueError(f"{self.label} must be {'<' if self.high_open else '<='} {self.high}, got {v}")
        return v

    def toml(self):
        return AUTO if self.default is None else self.default


def _as_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


def S(name, default, help, where, **kw) -> Setting:
    return Setting(name, default, help, frozenset(where), **kw)


SETTINGS = [
    # ---- what the federation runs on
    S("task", "digits", "task: model, input features and data", {RUN, CLIENT},
      choices=Plugins("task")),
    S("data-path", "", "dataset directory (fsdd, speechcommands, imagefolder); digits is embedded", {RUN, CLIENT}),
    S("num-clients", 10, "simulated devices (partitions)", {RUN}, low=1),
    S("min-clients", 2, "fewest replies a round needs", {RUN}, low=1),
    S("num-rounds", 1, "federated rounds", {RUN}, low=1),
    S("partitioning", "classes", "how users are cut from the pool: disjoint shares of a few classes "
      "(classes), one speaker each (speaker), label skew (dirichlet), or each user drawing client-samples "
      "from its own few classes, users overlapping (sampled: any number of clients)", {RUN, CLIENT},
      choices=("classes", "speaker", "dirichlet", "sampled")),
    S("classes-min", 2, "classes/sampled partitioning: fewest classes a user holds", {RUN, CLIENT}, low=1),
    S("classes-max", 3, "classes/sampled partitioning: most classes a user holds", {RUN, CLIENT}, low=1),
    S("client-samples", 40, "sampled partitioning: samples each user draws (unlabeled + held out)",
      {RUN, CLIENT}, low=2, high=100_000),
    S("dirichlet-alpha", 0.5, "dirichlet partitioning: label skew (smaller: more skewed)", {RUN, CLIENT}, low=1e-6),
    S("heldout-frac", 0.3, "share of each simulated user's data held out, labeled, for research accuracy",
      {RUN, CLIENT}, low=0.01, high=0.9),
    # ---- the engine (PruneConfig; `fineprune personalize` options)
    # usage stays the default scorer: why, in docs/personalization.md (Earlier rounds)
    S("scoring", "usage", "importance criterion (low scores are pruned first)", {RUN, CLIENT, PRUNE},
      choices=Plugins("scoring")),
    S("scope", "global", "global: one ranking; layer: same sparsity per layer; row: per output unit",
      {RUN, CLIENT, PRUNE}, choices=("global", "layer", "row")),
    S("step", 0.1, "share of the remaining connections pruned per schedule step", {RUN, CLIENT, PRUNE},
      low=1e-3, high=1.0, high_open=True),
    S("target-sparsity", None, "prune exactly to this sparsity, no stop rule ('auto': the stop rule decides)",
      {RUN, CLIENT, PRUNE}, kind=float, low=0.0, high=1.0, high_open=True),
    S("max-sparsity", 0.95, "the stop rule's search never goes past this sparsity", {RUN, CLIENT, PRUNE},
      low=1e-3, high=1.0, high_open=True),
    S("stop-rule", "agreement", "label-free rule that ends pruning", {RUN, CLIENT, PRUNE},
      choices=Plugins("stop-rule")),
    S("evidence-samples", 32, "a user with n samples is pruned at most max-sparsity x n / (n + this): a probe of a "
      "dozen samples cannot see what pruning costs (0: no bound)", {RUN, CLIENT, PRUNE}, low=0),
    S("stop-margin", 2, "where the stop rule failed, or the search reached a bound that the federation's prior "
      "raised past the device's own (never below its own there), keep this many schedule steps below the last "
      "that passed (a guard against the probe's sampling error and the search's optimism: S9, S38, P8)",
      {RUN, CLIENT, PRUNE}, low=0, high=10),
    S("confirm", "auto", "judge the stop rule's pick again on a second probe, as many of the user's samples that the "
      "search never saw, and bisect the levels below it where the rule fails there: safer stops for one or two "
      "passes over the second probe more (S31, docs/personalization.md). on, off, or auto: only where nothing "
      "on the device adapts the model (no statistics follow the user, the base's output layer), so pruning is "
      "all that changes it (S35)",
      {RUN, CLIENT, PRUNE}, choices=("auto", "on", "off"),
      aliases=(("true", "on"), ("false", "off"))),  # its spelling when it was a switch
    S("tolerance", 0.02, "how far the stop rule may degrade (agreement: >= 98% of the probe by default)",
      {RUN, CLIENT, PRUNE}, low=0.0, high=1.0),
    S("search", "bisect", "bisect over the nested schedule, or linear step by step", {RUN, CLIENT, PRUNE},
      choices=("bisect", "linear")),
    S("rescore", False, "linear search only: re-collect statistics and re-score after every step",
      {RUN, CLIENT, PRUNE}),
    S("probe-size", 0, "samples that judge the stop rule and recalibrate BatchNorm (0: a quarter, 32 to 128)",
      {RUN, CLIENT, PRUNE}, low=0),
    S("recalibrate-bn", True, "re-estimate BatchNorm statistics on the user's data (usage is then measured "
      "on the adapted network); on a network without BatchNorm, move its first layer's channel means to the "
      "user's instead", {RUN, CLIENT, PRUNE}),
    S("bn-adapt", "auto", "which BatchNorm statistics follow the user: full (every layer, AdaBN), stem (the input "
      "side only: safe under label shift), auto (full where it predicts no more classes than a recalibration "
      "of only the channels the class mix cannot explain, else stem; stem for a base without the vendor's "
      "record)", {RUN, CLIENT, PRUNE},
      choices=("auto", "full", "stem")),
    S("compensate", "on", "put each pruned connection's mean contribution on the user's data back as a constant "
      "(the unit's bias, or the statistics of the BatchNorm after it where they are not re-estimated), so a "
      "unit keeps its mean output (on, off)", {RUN, CLIENT, PRUNE},
      choices=("on", "off")),
    S("paired-bn", True, "the kept mask's BatchNorm statistics: the statistics pass's (all of the user's data) moved "
      "by what the mask changes on the probe (true), or the probe's own (false, the ablation)", {RUN, CLIENT, PRUNE}),
    S("base-stats", False, "ablation: measure usage on the unadapted base (needs recalibrate-bn)", {RUN, CLIENT, PRUNE}),
    S("restrict-outputs", False, "classes the adapted model never predicts for this user become impossible "
      "(a hard cut: never for inputs unlike the base's)", {RUN, CLIENT, PRUNE}),
    S("restrict-min-frac", 0.01, "a class stays when predicted for at least this share of the user's samples",
      {RUN, CLIENT, PRUNE}, low=0.0, high=0.5),
    S("restrict-margin", 0.5, "a class also stays as the runner-up of a sample whose top class is less than this "
      "much more probable (0: top-1 only)", {RUN, CLIENT, PRUNE}, low=0.0, high=1.0),
    S("refit", False, "structured scorers (firing, channel-usage): after pruning, re-solve each layer that "
      "read a removed unit by least squares so it gives the unpruned adapted model's outputs on the user's "
      "data (forward passes only, no labels; chain models and the inside of ResNet blocks)", {RUN, CLIENT, PRUNE}),
    S("head", "auto", "the output layer: linear (the base's), prototypes (T3A prototypes of the user's "
      "pseudo-labelled features, forward only; refined on those features where the pseudo-labels spread over "
      "most classes), blend (half each, in logits), label-shift (the base's, its "
      "output prior moved from the vendor's class mix toward the one EM estimates on the user's data), "
      "auto (the base's below head-min-support samples per class, prototypes from prototype-min-support, "
      "else blend; label-shift "
      "instead of prototypes where only the user's class mix moved the model)", {RUN, CLIENT, PRUNE},
      choices=("linear", "prototypes", "blend", "label-shift", "auto")),
    S("head-min-support", 4.0, "head auto: samples per class (of the classes the user's data spreads over) "
      "below which the base's output layer stays (prototypes of 1-3 samples are noise)", {RUN, CLIENT, PRUNE},
      low=0.0),
    S("prototype-min-support", 10.0, "head auto: samples per class (of the classes the user's data spreads over) "
      "from which prototypes replace the blend", {RUN, CLIENT, PRUNE}, low=0.0),
    S("batch-size", 256, "samples per forward pass", {RUN, CLIENT, PRUNE}, low=1),
    S("seed", 0, "seed of every random choice (partitions, probes, sketches)", {RUN, CLIENT, PRUNE}, low=0),
    S("device", "auto", "where the engine runs: auto (a GPU when there is one), cpu or cuda", {RUN, CLIENT, CLI},
      choices=("auto", "cpu", "cuda")),
    # ---- what a device uploads
    S("summary-level", "sketch", "stats | sketch (MinHash) | bitmap", {RUN, CLIENT},
      choices=Plugins("summary-level")),
    S("sketch-frac", 0.003, "sketch level: the share of the dense model's size the MinHash sketch takes (the "
      "server refuses sketches of any other size)", {RUN, CLIENT}, low=1e-4, high=0.05),
    S("privacy-epsilon", 0.0, "> 0: local DP, randomized response on mask bits (bitmap level)", {RUN, CLIENT}, low=0.0),
    S("research-accuracy", True, "simulation only: held-out labeled accuracy, for research", {RUN, CLIENT}),
    # ---- the server
    S("prior", "auto", "later rounds: the server sends each device the share of devices (at least slim-min-clients, "
      "outliers out; in private mode each randomized mask counts tanh(epsilon/2)^2 of one) that pruned each "
      "connection in the round before, and the device blends it with its own "
      "ranking: on, off, or auto (on where the summaries are bitmaps and there is no slim base); unless off, also "
      "the class directions of class-sums", {RUN},
      choices=("auto", "on", "off")),
    S("prior-samples", 32.0, "how many of a device's own samples the server's prior is worth: a device with n "
      "samples ranks by its own scores w = n / (n + this) and by the prior the rest, and its stop rule may search "
      "as far as n + min((1 - w) x this, 2n) samples allow", {RUN, CLIENT}, low=0.0),
    S("class-sums", True, "later rounds with the prior: each device also uploads the mean of its centred features "
      "per class it predicts (classes x features numbers and the counts; never in private mode), and the server "
      "gives back their means over at least slim-min-clients devices, which data-poor devices whose data spread "
      "over the classes blend into their output layer (P6, docs/federation.md)", {RUN, CLIENT}),
    S("slim-base", False, "derive a slimmer shared base from the consensus and send it next round", {RUN}),
    S("slim-min-clients", 5, "slim base: fewest clients whose (non-outlier) masks it may be derived from; with "
      "fewer it would reveal what they pruned", {RUN}, low=2),
    S("slim-quorum", 1.0, "slim base: prune what at least this share of clients pruned", {RUN}, low=0.0, high=1.0),
    S("consensus-quorum", 0.5, "consensus mask: pruned by at least this share of clients", {RUN}, low=0.0, high=1.0),
    S("cluster-threshold", 0.1, "users closer than this (1 - Jaccard) fall in one cluster", {RUN}, low=0.0, high=1.0),
    S("base-checkpoint", "", "base model file; empty: pretrain the task's base at the start", {RUN}),
    S("pretrain-epochs", 0, "0: the task's default", {RUN}, low=0),
    S("out-dir", "", "empty: ~/fineprune-runs/<time>", {RUN}),
    S("round-timeout", 600.0, "seconds a round waits for replies; a device abandons its work after as long",
      {RUN, CLIENT}, low=1.0),
]
BY_NAME = {s.name: s for s in SETTINGS}


def names(where: str) -> tuple:
    return tuple(s.name for s in SETTINGS if where in s.where)


def run_config_defaults() -> dict:
    """What [tool.flwr.app.config] of pyproject.toml holds (TOML spelling: AUTO for None)."""
    return {s.name: s.toml() for s in SETTINGS if RUN in s.where}


PYPROJECT_HEADER = "[tool.flwr.app.config]"
PYPROJECT_NOTE = ("# generated from common/settings.py, the one settings table: python -m common.settings "
                  "--write pyproject.toml")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def pyproject_block() -> str:
    """[tool.flwr.app.config] as pyproject.toml holds it: Flower reads a run's defaults from there,
    so the table's RUN settings are written out, one line each."""
    return "\n".join([PYPROJECT_HEADER, PYPROJECT_NOTE] +
                     [f"{k} = {_toml_value(v)}" for k, v in run_config_defaults().items()]) + "\n"


def write_pyproject(path) -> None:
    """Replace pyproject.toml's [tool.flwr.app.config] block with pyproject_block() (atomically)."""
    from pathlib import Path

    from common.io import atomic_write_text

    text = Path(path).read_text()
    start = text.index(PYPROJECT_HEADER)
    nxt = text.find("\n[", start + len(PYPROJECT_HEADER))
    end = len(text) if nxt < 0 else nxt + 1
    rest = text[end:]
    atomic_write_text(path, text[:start] + pyproject_block() + ("\n" + rest if rest else ""))


def parse_values(values: dict, where: str = RUN) -> dict:
    """Defaults of the `where` settings, overridden by `values` (any spelling), all checked."""
    out = {s.name: s.default for s in SETTINGS if where in s.where}
    for k, v in values.items():
        if k not in out:
            raise ValueError(f"unknown setting '{k}' (known: {', '.join(out)})")
        out[k] = BY_NAME[k].parse(v)
    return out


def add_options(parser, where=(PRUNE, CLI)) -> None:
    """One --option per setting read at `where`, with the table's help and default. Values stay
    raw strings here (None: not given) and are checked by `given_options`, so a bad value gets
    the program's one-line error like any other bad input."""
    import argparse

    for s in SETTINGS:
        if not s.where & set(where):
            continue
        opts = s.options()
        extra = f"; one of: {', '.join(map(str, opts))}" if opts else ""
        text = s.help.replace("%", "%%")  # argparse formats help with %
        if s.type is bool:
            parser.add_argument(f"--{s.name}", dest=s.attr, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default {'on' if s.default else 'off'})")
        else:
            parser.add_argument(f"--{s.name}", dest=s.attr, default=None, metavar=s.type.__name__.upper(),
                                help=f"{text} (default {s.toml()}{extra})")


def given_options(args, where: str) -> dict:
    """The checked values of the `where` settings: the table's defaults, overridden by the options
    given on the command line."""
    return parse_values({s.name: getattr(args, s.attr) for s in SETTINGS
                         if where in s.where and getattr(args, s.attr, None) is not None}, where)


class _PruneConfigBase:
    def validate(self):
        """Every field checked against the settings table, then the combinations it cannot express
        (the engine adds those that need its registries: common.engine.prune.check_config)."""
        for st in SETTINGS:
            if PRUNE in st.where:
                st.check(getattr(self, st.attr))
        if self.rescore and self.search != "linear":
            raise ValueError("rescore re-scores after every step of a linear search: it needs search 'linear'")
        if self.base_stats and not self.recalibrate_bn:
            raise ValueError("base_stats is an ablation of BatchNorm recalibration: it needs recalibrate_bn")
        return self

    @classmethod
    def from_settings(cls, values: dict) -> "PruneConfig":
        """From checked settings (parse_values), keyed by setting name."""
        return cls(**{BY_NAME[k].attr: v for k, v in values.items() if PRUNE in BY_NAME[k].where}).validate()

    def settings(self) -> dict:
        """Setting name -> value: what identifies a personalization (the resume key)."""
        return {st.name: getattr(self, st.attr) for st in SETTINGS if PRUNE in st.where}


# The engine's settings: one field per PRUNE row of the table, with its default there. The engine
# receives one of these and never reads the table itself.
PruneConfig = make_dataclass(
    "PruneConfig",
    [(st.attr, st.type if st.default is not None else (st.type | None), field(default=st.default))
     for st in SETTINGS if PRUNE in st.where],
    bases=(_PruneConfigBase,))
PruneConfig.__module__ = __name__  # pickles (spawned benchmark children) find it here


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        write_pyproject(sys.argv[2])
    else:
        sys.stdout.write(pyproject_block())
