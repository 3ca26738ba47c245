"""The server's Flower strategy: send the base model once, collect and validate mask summaries,
analyze shared sparsity and give back what it learned in the next round: the federation's prior
(the share of devices that pruned each connection, and the class directions pooled from their
class means) or a slimmer shared base. Why ~340 lines: a reply is checked field by field where it
is read, so the whole trust boundary of the server is one file (the envelope's names are
common/wire/envelope.py's)."""
from __future__ import annotations

import copy
import math
import re
import time
from logging import INFO, WARNING
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.engine.class_prior import class_shape
from common.model.architectures import prunable_shapes
from common.model.checkpoint import fingerprint
from common.model.compact import compact
from common.wire import envelope as E
from common.wire import prior as PW
from common.wire.federation import CLIENT_KEYS, base_to_records, class_prior_enabled, model_bytes, prior_enabled
from common.wire.privacy import effective_voters
from common.wire.summary import SummaryError, decode, sketch_budget
from server.analysis import analyze, class_directions, consensus, pruned_per_layer, pruned_shares, robust_voters

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:@+-]{1,64}")
MAX_REASON = 500


class FinePruneStrategy(Strategy):
    def __init__(self, base, meta: dict, cfg: dict):
        self.cfg = cfg
        self.rounds: list[dict] = []
        self.on_round = None  # called with each round's record (the server writes its report)
        self.nodes_with_base: dict[int, str] = {}
        self._sent: dict[int, bool] = {}  # node -> whether this round's message carried the base
        self._out: list[Message] = []     # this round's messages (Flower sets their ids when it sends them)
        self._claims: dict[str, set] = {}  # client id -> the authenticated nodes that ever claimed it
        self.epsilon = cfg["privacy-epsilon"] if cfg["privacy-epsilon"] > 0 else None
        self._prior = None          # the records of the prior this round sends, or None
        self._classes = None        # the records of the class directions this round sends, or None
        self._no_prior: set = set()  # nodes whose last mask was an outlier: they get none
        self._prior_sent: set = set()  # nodes this round's prior went to
        self._set_base(base, meta)

    def _set_base(self, base, meta):
        self.base, self.meta = base, meta
        self.fp = fingerprint(base)
        self.shapes = prunable_shapes(base)
        self.model_bytes = model_bytes(base)
        # the largest honest summary is a bitmap: 1 bit per weight (+ headers); more is an attack
        self.max_summary_bytes = sum(math.prod(v) for v in self.shapes.values()) // 8 + (256 << 10)
        self.sketch_bins = sketch_budget([math.prod(v) for v in self.shapes.values()], self.model_bytes,
                                         self.cfg["sketch-frac"])
        # the class means a reply may carry (class-sums): the output layer's classes x features, in
        # base64 float16 beside a count of up to 10 digits per class
        self.classes_shape = class_shape(base) if class_prior_enabled(self.cfg, meta) else None
        if self.classes_shape is not None:
            c, d = self.classes_shape
            self.max_summary_bytes += 4 * math.ceil(2 * c * d / 3) + 12 * c

    def summary(self) -> None:
        log(INFO, "\t├── FinePruneStrategy: %s clients (min %s), summary level %s, scoring %s",
            self.cfg["num-clients"], self.cfg["min-clients"], self.cfg["summary-level"], self.cfg["scoring"])
        log(INFO, "\t└── base model %s (%s, %d bytes fp32)", self.fp[:12], self.meta["arch"], self.model_bytes)

    # ------------------------------------------------------------ round: send
    def _wait_for_nodes(self, grid: Grid, gather_seconds: float = 10.0) -> list[int]:
        """All num-clients nodes, or after a short wait at least min-clients of them."""
        start = time.time()
        while True:
            nodes = sorted(grid.get_node_ids())
            waited = time.time() - start
            if len(nodes) >= self.cfg["num-clients"]:
                return nodes[: self.cfg["num-clients"]]
            if len(nodes) >= self.cfg["min-clients"] and waited > gather_seconds:
                return nodes
            if waited > self.cfg["round-timeout"]:
                raise RuntimeError(f"only {len(nodes)} nodes connected, min-clients is {self.cfg['min-clients']}")
            time.sleep(0.5)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self._wait_for_nodes(grid)
        conf = {k: self.cfg[k] for k in CLIENT_KEYS}
        conf.update({E.BASE_FINGERPRINT: self.fp, E.OUT_DIR: self.cfg["out-dir"], E.ROUND: server_round})
        # class means only where a later round gives back their pool
        conf["class-sums"] = self.classes_shape is not None and server_round < self.cfg["num-rounds"]
        base_arrays, base_meta = base_to_records(self.base, self.meta)
        msgs = []
        for nid in nodes:
            content = RecordDict({E.CONFIG: ConfigRecord(conf)})
            if self.nodes_with_base.get(nid) != self.fp:  # the model travels once per node and base
                content[E.BASE] = base_arrays
                content[E.BASE_META] = base_meta
            if self._prior is not None and nid not in self._no_prior:
                content[E.PRIOR], content[E.PRIOR_META] = self._prior
            if self._classes is not None:  # an outlier mask does not vote, but its device may gain from them
                content[E.CLASSES], content[E.CLASSES_META] = self._classes
            msgs.append(Message(content=content, dst_node_id=nid, message_type=MessageType.TRAIN,
                                group_id=str(server_round)))
        self._sent = {m.metadata.dst_node_id: (E.BASE in m.content.array_records) for m in msgs}
        self._prior_sent = {m.metadata.dst_node_id for m in msgs
                            if E.PRIOR in m.content.array_records or E.CLASSES in m.content.array_records}
        self._out = msgs
        log(INFO, "round %d: sending to %d nodes (%d get the base model, %d the prior)", server_round, len(msgs),
            sum(self._sent.values()), len(self._prior_sent))
        return msgs

    # ------------------------------------------------------------ round: collect
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        rows, summaries, rejected, failed = [], {}, [], []
        answered = set()
        # an error reply made by the SuperLink (e.g. "node unavailable") comes from the SuperLink's
        # own node id: the message it answers tells which node it stands for
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self._out}
        replied, accepted = set(), []
        for msg in replies:
            nid = msg.metadata.src_node_id
            if nid not in self._sent:
                nid = dst_of.get(msg.metadata.reply_to_message_id, nid)
            answered.add(nid)
            if msg.has_error():
                reason = f"client error: {_short_reason(msg.error.reason)}"
                failed.append({"node": nid, "reason": reason, "kind": E.failure_kind(msg.error.code)})
                log(WARNING, "round %d: node %s failed: %s", server_round, nid, reason)
                continue
            try:
                row, summ = self._read_reply(msg)
            except SummaryError as exc:
                rejected.append({"node": nid, "reason": str(exc), "kind": exc.kind})
                log(WARNING, "round %d: rejected summary from node %s: %s", server_round, nid, exc)
                continue
            if self._sent.get(nid):
                self.nodes_with_base[nid] = self.fp
            if nid in replied:
                rejected.append({"node": nid, "reason": f"duplicate reply from node {nid}", "kind": "duplicate"})
                continue
            replied.add(nid)
            self._claims.setdefault(row["id"], set()).add(nid)
            accepted.append((nid, row, summ))
        # a client id is bound to the node that sent it: one claimed by several nodes (one of them
        # impersonating another) is shown with each node's id, so no claim pushes another out
        for nid, row, summ in accepted:
            if len(self._claims[row["id"]]) > 1:
                row["id"], row["id_claimed_by_nodes"] = f"{row['id']}@{nid}", len(self._claims[row["id"]])
            row["with_prior"] = nid in self._prior_sent
            rows.append(row)
            summaries[row["id"]] = summ
        for nid in set(self._sent) - answered:
            failed.append({"node": nid, "reason": "no reply before the round timeout (dropped out)",
                           "kind": "no-reply"})
        for f in failed:  # its stored base may be what broke: send the base again next round
            self.nodes_with_base.pop(f["node"], None)
        analysis = analyze(summaries, self.shapes, self.cfg["consensus-quorum"], self.cfg["cluster-threshold"])
        record = {"round": server_round, "base_fingerprint": self.fp, "base_bytes": self.model_bytes,
                  "clients": sorted(rows, key=lambda r: r["id"]), "rejected": rejected, "failed": failed,
                  "incidents": {"rejected": _count_kinds(rejected), "failed": _count_kinds(failed)},
                  "analysis": analysis}
        self.rounds.append(record)
        log(INFO, "round %d: %d summaries accepted, %d rejected, %d failed; mean sparsity %.3f",
            server_round, len(rows), len(rejected), len(failed),
            sum(r["sparsity"] for r in rows) / max(len(rows), 1))
        new_arrays = None
        if self.cfg["slim-base"] and server_round < self.cfg["num-rounds"]:
            new_arrays = self._slim_base(summaries, record)
        self._prior = self._classes = None
        if prior_enabled(self.cfg) and server_round < self.cfg["num-rounds"]:
            self._make_prior(summaries, rows, record, server_round)
        elif self.cfg["prior"] == "auto" and server_round < self.cfg["num-rounds"]:
            record["prior"] = {"skipped": "the prior is built from masks: it needs summary-level bitmap"
                               if self.cfg["summary-level"] != "bitmap" else "slim-base replaces the base instead"}
        if self.classes_shape is not None and server_round < self.cfg["num-rounds"]:
            outliers = record.get("prior", {}).get("outliers", [])  # the mask prior's, this round
            classes, record["class_prior"] = class_directions(summaries, outliers, self.cfg["slim-min-clients"])
            self._classes = None if classes is None else PW.classes_to_records(classes, server_round)
        if self.on_round is not None:
            self.on_round(record)
        metrics = MetricRecord({"accepted": len(rows), "rejected": len(rejected), "failed": len(failed)})
        return new_arrays, metrics

    def _read_reply(self, msg: Message):
        """A reply's summary and report row, every field checked; anything unexpected in it is a
        counted rejection, never an error that escapes the round."""
        try:
            return self._check_reply(msg)
        except SummaryError:
            raise
        except Exception as exc:  # a shape of malformed reply no check above foresaw
            raise SummaryError(f"malformed reply ({type(exc).__name__})", "format") from None

    def _check_reply(self, msg: Message):
        content = msg.content
        try:
            data = content[E.SUMMARY][E.SUMMARY_DATA]
            info, metrics = content[E.INFO], content[E.METRICS]
            cid, stop_reason = info[E.CLIENT], info[E.STOP_REASON]
        except (KeyError, TypeError) as exc:
            raise SummaryError(f"reply lacks {exc}", "format") from None
        # device text goes into the report, its Markdown and its plots: a short id of plain
        # characters (no '$' for matplotlib's mathtext, no '|' for Markdown tables), a bounded reason
        if not (isinstance(cid, str) and CLIENT_ID.fullmatch(cid)):
            raise SummaryError(f"client id {str(cid)[:40]!r} is not 1-64 letters, digits or ._:@+-", "format")
        if not (isinstance(stop_reason, str) and len(stop_reason) <= MAX_REASON):
            raise SummaryError(f"stop_reason is not text of at most {MAX_REASON} characters", "format")
        stop_reason = "".join(ch if ch.isprintable() and ch not in "|$`" else " " for ch in stop_reason)
        extra = set(content.keys()) - set(E.REPLY_RECORDS)
        if extra or content.array_records:
            raise SummaryError(f"reply carries more than a summary: {sorted(extra) or 'arrays'}", "extra-content")
        summ = decode(data, self.fp, self.shapes, self.max_summary_bytes, self.epsilon, self.sketch_bins,
                      self.classes_shape)
        if summ.level != self.cfg["summary-level"]:  # a valid summary of another level wipes the analysis
            raise SummaryError(f"summary level '{summ.level}' is not the run's '{self.cfg['summary-level']}'", "level")
        sizes = [math.prod(v) for v in self.shapes.values()]
        sparsity = sum(pruned_per_layer(summ, sizes)) / sum(sizes)
        m = dict(metrics)
        if summ.epsilon is None:  # a private summary's exact sparsity is not sent: it is estimated
            reported = _finite(m, "sparsity")
            if abs(reported - sparsity) > 1e-6:
                raise SummaryError(f"reported sparsity {reported} disagrees with the summary ({sparsity:.6f})",
                                   "metrics")
        for k in ("prune_seconds", "upload_bytes"):
            v = _finite(m, k)
            if not 0 <= v < 1e12:
                raise SummaryError(f"metric {k}={v!r} out of range", "metrics")
        if "num_samples" in m:
            v = _finite(m, "num_samples")
            if not (0 <= v <= 1e9 and v == int(v)):
                raise SummaryError(f"metric num_samples={v!r} is not a sample count", "metrics")
        if summ.classes is not None and int(summ.classes[1].sum()) != int(m.get("num_samples", -1)):
            raise SummaryError("class counts do not add up to the reported sample count", "metrics")
        row = {"id": cid, "node": msg.metadata.src_node_id, "sparsity": sparsity,
               "upload_bytes": len(data), "upload_fraction": len(data) / self.model_bytes,
               "summary_level": summ.level, "prune_seconds": float(m["prune_seconds"]),
               "stop_reason": stop_reason, "resumed": bool(m.get("resumed", 0)),
               "num_samples": int(m.get("num_samples", 0))}
        if summ.epsilon is not None:
            row["sparsity_estimated"] = True
        for k in ("accuracy_base", "accuracy_personalized"):
            if k in m:
                v = _finite(m, k)
                if not 0 <= v <= 1:
                    raise SummaryError(f"metric {k}={v} out of range", "metrics")
                row[k] = v
        return row, summ

    def _slim_base(self, summaries, record) -> ArrayRecord | None:
        if self.epsilon is not None:  # merged_config refuses it; a strategy built around it still derives none
            record["slim_base"] = {"skipped": "private run: no slim base"}
            return None
        bitmaps = {k: s.bitmap for k, s in summaries.items() if s.bitmap is not None}
        if not bitmaps or len(bitmaps) != len(summaries):
            record["slim_base"] = {"skipped": "needs summary-level bitmap from every client"}
            return None
        # A consensus of few masks is those masks: with one honest peer and an attacker's
        # all-pruned mask, "pruned by all" is the peer's mask, sent to every node. Outlier masks
        # do not vote, and too few voters derive no base.
        voters, outliers = robust_voters(bitmaps)
        if len(voters) < self.cfg["slim-min-clients"]:
            record["slim_base"] = {"skipped": f"{len(voters)} non-outlier masks, slim-min-clients is "
                                              f"{self.cfg['slim-min-clients']}", "outliers": outliers}
            return None
        bitmaps = voters
        cons = consensus(bitmaps, self.cfg["slim-quorum"], self.epsilon)
        model = copy.deepcopy(self.base)
        meta = dict(self.meta)
        if hasattr(model, "prunable_chain"):
            model, _, meta["arch_kwargs"] = compact(model, cons, meta["arch"], dict(meta["arch_kwargs"]))
        else:
            cons.apply(model)
        before, after = self.model_bytes, model_bytes(model)
        record["slim_base"] = {"quorum": self.cfg["slim-quorum"], "consensus_sparsity": cons.sparsity(),
                               "bytes_before": before, "bytes_after": after,
                               "size_reduction": 1 - after / before, "arch_kwargs": meta["arch_kwargs"],
                               "voters": len(bitmaps), "outliers": outliers}
        log(INFO, "slim shared base: %d -> %d bytes (%.1f%% smaller)", before, after, 100 * (1 - after / before))
        self._set_base(model, meta)
        return ArrayRecord.from_torch_state_dict(model.state_dict())

    def _make_prior(self, summaries, rows, record, server_round) -> None:
        """The next round's prior: per connection, the share of this round's non-outlier masks that
        pruned it, over at least slim-min-clients of them (randomized masks counted for what their
        bits still tell, common.wire.privacy.effective_voters); with fewer, none (the devices then
        work as in a one-round run). An outlier's node gets none next round: its data are unlike the
        others'."""
        self._prior, self._no_prior = None, set()
        bitmaps = {k: s.bitmap for k, s in summaries.items() if s.bitmap is not None}
        voters, outliers = robust_voters(bitmaps) if bitmaps else ({}, [])
        k = self.cfg["slim-min-clients"]
        worth = effective_voters(len(voters), self.epsilon)
        if worth < k:  # P11: randomized masks count for what their bits still tell
            noisy = f" at epsilon {self.epsilon:g}, worth {worth:.1f} exact ones" if self.epsilon else ""
            record["prior"] = {"skipped": f"{len(voters)} non-outlier masks{noisy}, slim-min-clients is {k}"}
            return
        shares = pruned_shares(voters, self.epsilon)
        self._prior = PW.to_records(shares, len(voters), server_round)
        node_of = {r["id"]: r["node"] for r in rows}
        self._no_prior = {node_of[c] for c in outliers if c in node_of}
        flat = torch.cat([v.flatten() for v in shares.values()])
        record["prior"] = {"voters": len(voters), "outliers": outliers, "mean_share": float(flat.mean()),
                           "shared_by_half": float((flat >= 0.5).float().mean()), "bytes": int(flat.numel()),
                           "debiased": self.epsilon is not None}
        log(INFO, "prior for round %d: shares of %d masks (%d outliers get none)", server_round + 1, len(voters),
            len(self._no_prior))

    # ------------------------------------------------------------ no federated evaluation round
    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


def _finite(metrics: dict, key: str) -> float:
    """A metric the reply must carry as a finite number."""
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SummaryError(f"metric {key}={v!r} missing, not a number, NaN or infinite", "metrics")
    return float(v)


def _count_kinds(items: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it["kind"]] = out.get(it["kind"], 0) + 1
    return out


def _short_reason(text: str) -> str:
    """The useful line of a remote traceback: the exception's own message."""
    text = str(text or "unknown error")
    if "Message:" in text:
        line = text.rsplit("Message:", 1)[1].strip().splitlines()[0][:300]
    else:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        line = lines[-1][:300] if lines else "unknown error"
    return "".join(ch if ch.isprintable() else " " for ch in line)  # no terminal escapes reach a log
