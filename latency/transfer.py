"""Few-shot latency transfer: a new device's table from a known one and K measurements.

Device A is fully measured, device B is new. Measuring every block on B is what takes the
time; instead we pick K representative blocks, measure them on B, and learn how B relates to
A. Block latencies on two devices are mostly one scaling apart, with a part that depends on
the block's size (big blocks gain more from extra cores or wider units than small, overhead-
bound ones) and on its kind (attention and convolutions move differently). So the model is

    log(B / A) = b0 + w . [log A_ms, log FLOPs, log bytes] + offset[kind]     (ridge)

fitted on the K anchors, with the ridge strength picked by leave-one-out error. A's own
table is complete, so A's quirks can be seen there first: a block more than 3x off what A
takes for blocks of its size and kind (a stall, a thread barrier waiting for a busy core) is
a property of A that B need not share, and its A latency is tempered to that bound before
anything is fitted. The blocks not measured on B are stored with source `predicted`, never
`measured`: a later real measurement supersedes them, and queueing jobs for B still lists
them as missing. (Cf. HELP, Lee et al. 2021: 0.93 rank correlation from 10 samples via
meta-learning; this is the plain-regression version of the same idea.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from search_spaces import UserError

from .backends import Timing
from .jobs import in_call_order
from .signature import BlockSignature, torch_dtype
from .table import LatencyTable, Measurement, check_device_name

LAMBDAS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
QUIRK = math.log(3.0)  # how far (in log ms) A may stray from its own size trend


@lru_cache(maxsize=4096)
def block_cost(sig: BlockSignature) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one call, counted on the meta device: no weights, no time."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module = sig.build("meta")
    inputs = tuple(x.to("meta") for x in sig.example_inputs())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = module(*inputs)
    item = torch.empty((), dtype=torch_dtype(sig.dtype)).element_size()
    moved = sum(p.numel() for p in module.parameters()) * item
    moved += sum(x.numel() * x.element_size() for x in inputs) + out.numel() * item
    return float(counter.get_total_flops()), float(moved)


@dataclass
class Candidate:
    signature: BlockSignature  # in B's precision
    source_ms: float  # its latency on A

    def features(self) -> list[float]:
        flops, moved = block_cost(self.signature)
        return [math.log(self.source_ms), math.log1p(flops), math.log(moved + 1)]


class TransferModel:
    """Ridge regression of log(B/A) on standardised size features and kind offsets."""

    def __init__(self, lam: float = 1.0):
        self.lam = lam

    def _design(self, cands: list[Candidate]) -> np.ndarray:
        x = (np.array([c.features() for c in cands]) - self.mean) / self.scale
        kinds = np.array([[c.signature.kind == k for k in self.kinds] for c in cands], float)
        return np.hstack([np.ones((len(cands), 1)), x, kinds.reshape(len(cands), -1)])

    def fit(self, cands: list[Candidate], target_ms: list[float], everyone: list[Candidate]):
        feats = np.array([c.features() for c in everyone])  # standardise over all blocks
        self.mean, self.scale = feats.mean(0), feats.std(0) + 1e-9
        self.kinds = sorted({c.signature.kind for c in cands})
        x = self._design(cands)
        y = np.log(np.array(target_ms) / np.array([c.source_ms for c in cands]))
        penalty = self.lam * np.eye(x.shape[1])
        penalty[0, 0] = 0.0  # the overall ratio is not shrunk
        self.w = np.linalg.solve(x.T @ x + penalty, x.T @ y)
        return self

    def predict(self, cands: list[Candidate]) -> np.ndarray:
        src = np.array([c.source_ms for c in cands])
        return src * np.exp(self._design(cands) @ self.w)


def loo_mape(cands: list[Candidate], target_ms: list[float], everyone, lam: float) -> float:
    """Leave-one-out MAPE (%) of the model on the anchors: what to expect on the rest."""
    if len(cands) < 3:
        return float("nan")
    errors = []
    for i in range(len(cands)):
        rest = [j for j in range(len(cands)) if j != i]
        model = TransferModel(lam).fit(
            [cands[j] for j in rest], [target_ms[j] for j in rest], everyone
        )
        errors.append(abs(model.predict([cands[i]])[0] / target_ms[i] - 1))
    return 100 * float(np.mean(errors))


def temper_quirks(cands: list[Candidate]) -> tuple[list[Candidate], int]:
    """A's latencies with its gross anomalies pulled back to 3x its size-and-kind trend.

    The trend is a least-squares fit of log A on [log FLOPs, log bytes, kind] over all of A's
    blocks, refitted twice without the blocks it misses by more than 3 robust deviations.
    Returns the candidates (A latency tempered) and how many were tempered."""
    kinds = sorted({c.signature.kind for c in cands})
    x = np.array([[1.0, *c.features()[1:], *(c.signature.kind == k for k in kinds)] for c in cands])
    if len(cands) < 2 * x.shape[1]:  # too few blocks to know A's trend
        return cands, 0
    y = np.log([c.source_ms for c in cands])
    keep = np.ones(len(y), bool)
    for _ in range(3):
        w = np.linalg.lstsq(x[keep], y[keep], rcond=None)[0]
        resid = y - x @ w
        spread = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep])))
        keep = np.abs(resid) <= 3 * spread + 1e-9
    bound = max(QUIRK, 3 * spread)
    tempered = np.exp(x @ w + np.clip(resid, -bound, bound))
    changed = int(np.sum(np.abs(resid) > bound))
    return [
        Candidate(c.signature, float(ms)) for c, ms in zip(cands, tempered, strict=True)
    ], changed


def choose(cands: list[Candidate], k: int, anchors: Iterable[BlockSignature] = ()) -> list[int]:
    """K representative candidates: greedy k-center over size features, kinds kept apart,
    so the picks span every kind and the whole latency range (indices into `cands`)."""
    if k <= 0 or not cands:
        return []
    feats = np.array([c.features() for c in cands])
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    kinds = sorted({c.signature.kind for c in cands})
    onehot = np.array([[c.signature.kind == kd for kd in kinds] for c in cands], float)
    points = np.hstack([feats, 3.0 * onehot])  # another kind counts as far away
    anchor_hashes = {a.hash for a in anchors}
    picked = [i for i, c in enumerate(cands) if c.signature.hash in anchor_hashes]
    chosen: list[int] = []
    if not picked:  # start from the most typical block
        chosen.append(int(np.argmin(np.linalg.norm(points - points.mean(0), axis=1))))
    dist = np.full(len(cands), np.inf)
    for i in picked + chosen:
        dist = np.minimum(dist, np.linalg.norm(points - points[i], axis=1))
    dist[picked + chosen] = -1.0
    while len(chosen) < min(k, len(cands) - len(picked)):
        i = int(np.argmax(dist))  # the block farthest from everything picked so far
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(points - points[i], axis=1))
        dist[picked + chosen] = -1.0
    return chosen


@dataclass
class TransferReport:
    source: str
    target: str
    setting: dict  # B's backend, compute_unit, precision
    anchors: list[str] = field(default_factory=list)  # hashes measured on B used to fit
    measured: list[str] = field(default_factory=list)  # of those, measured by this run
    to_measure: list[BlockSignature] = field(default_factory=list)  # chosen, not measured
    predicted: dict[str, float] = field(default_factory=dict)  # hash -> ms stored as predicted
    lam: float = float("nan")
    loo_mape: float = float("nan")
    quirks: int = 0  # A latencies tempered as A's own anomalies

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["to_measure"] = [s.hash for s in self.to_measure]
        return d


def _latest_measured(table: LatencyTable, device: str, setting: dict) -> dict[str, Measurement]:
    out = {}
    for m in table.rows(device):  # in id order: the newest wins
        key = (m.backend, m.compute_unit, m.precision)
        if m.source == "measured" and key == (
            setting["backend"],
            setting["compute_unit"],
            setting["precision"],
        ):
            out[m.signature.hash] = m
    return out


def transfer(
    table: LatencyTable,
    source: str,
    target: str,
    budget: int,
    target_setting: dict,
    measure: Callable[[BlockSignature], Timing] | None,
    signatures: Iterable[BlockSignature] | None = None,
    source_setting: dict | None = None,
    say: Callable[[str], None] = lambda s: None,
    target_signature: Callable[[BlockSignature], BlockSignature] | None = None,
) -> TransferReport:
    """Fill `target`'s table from `source`'s with `budget` measurements on the target.

    Measurements the target already has count toward the budget (so a rerun measures nothing
    new). With `measure` None the chosen blocks are only reported (`to_measure`), e.g. to be
    queued for the target's agents; run again once they are measured.
    `signatures` restricts the blocks to fill (default: every block measured on the source).
    `target_signature` maps a source block to the block the target runs in its place
    (default: the same block at the target's precision), e.g. the same layer at another
    batch size or resolution when the table of a new input size is filled from an old one."""
    check_device_name(target)
    if source == target:
        raise UserError("--from and --to name the same device; give two devices")
    if budget < 2:
        raise UserError("--budget must be at least 2 (the model needs two anchors to fit)")
    src_setting = table.setting(source, **(source_setting or {}))
    src = _latest_measured(table, source, src_setting)
    precision = target_setting["precision"]
    if signatures is not None:
        wanted = {s.with_dtype(src_setting["precision"]).hash for s in signatures}
        missing = wanted - set(src)
        if missing:
            raise UserError(
                f"{source!r} lacks {len(missing)} of the blocks asked for; measure them first "
                f"(diffnas latency build SPACE --device {source})"
            )
        src = {h: m for h, m in src.items() if h in wanted}
    to_target = target_signature or (lambda sig: sig.with_dtype(precision))
    cands = [Candidate(in_call_order(to_target(m.signature)), m.median_ms) for m in src.values()]
    cands, quirks = temper_quirks(cands)
    if len(cands) < budget:
        raise UserError(
            f"{source!r} has only {len(cands)} measured block(s); a budget of {budget} would "
            "measure everything: use `diffnas latency build` on the target instead"
        )
    known = {h: m.median_ms for h, m in _latest_measured(table, target, target_setting).items()}
    anchors = [i for i, c in enumerate(cands) if c.signature.hash in known]
    picks = choose(cands, budget - len(anchors), [cands[i].signature for i in anchors])
    report = TransferReport(source, target, dict(target_setting))
    if measure is None and picks:
        report.to_measure = [cands[i].signature for i in picks]
        report.anchors = [cands[i].signature.hash for i in anchors]
        return report
    for n, i in enumerate(picks, 1):
        sig = cands[i].signature
        timing = measure(sig)
        say(f"[{n}/{len(picks)}] measured {sig.describe()} on {target}: {timing.median_ms:.3f} ms")
        table.add(_row(target, target_setting, sig, timing.samples, timing.versions))
        known[sig.hash] = timing.median_ms
        report.measured.append(sig.hash)
    anchors = [i for i, c in enumerate(cands) if c.signature.hash in known]
    fit_c = [cands[i] for i in anchors]
    fit_y = [known[cands[i].signature.hash] for i in anchors]
    scores = {lam: loo_mape(fit_c, fit_y, cands, lam) for lam in LAMBDAS}
    lam = min(LAMBDAS, key=lambda v: (math.isnan(scores[v]), scores[v]))
    model = TransferModel(lam).fit(fit_c, fit_y, cands)
    rest = [c for c in cands if c.signature.hash not in known]
    versions = {
        "transfer_from": source,
        "model": "ridge log-ratio",
        "anchors": len(fit_c),
        "lambda": lam,
        "loo_mape": round(scores[lam], 3) if not math.isnan(scores[lam]) else None,
        "source_quirks_tempered": quirks,
    }
    rows = []
    for c, ms in zip(rest, model.predict(rest), strict=True):
        rows.append(_row(target, target_setting, c.signature, [float(ms)], versions, "predicted"))
        report.predicted[c.signature.hash] = float(ms)
    table.add(rows)
    report.anchors = [c.signature.hash for c in fit_c]
    report.lam, report.loo_mape, report.quirks = lam, scores[lam], quirks
    return report


def _row(device, setting, sig, samples, versions, source="measured") -> Measurement:
    timing = Timing(list(samples))
    return Measurement(
        device=device,
        backend=setting["backend"],
        compute_unit=setting["compute_unit"],
        precision=setting["precision"],
        signature=sig,
        samples=list(samples),
        median_ms=timing.median_ms,
        iqr_ms=timing.iqr_ms,
        source=source,
        versions=versions,
    )
