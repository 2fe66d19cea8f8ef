"""The Pareto comparison's summary: every method's points per target over seeds (mean, seed-to-
seed standard deviation, standard error), evolution's margin over each baseline, and each hand
design's verdict against the evolved front."""

from __future__ import annotations

import math
import statistics

SEARCHES = ("evolution", "optuna", "random")  # the searches compared, evolution first


def stats(values: list[float]) -> dict:
    """Mean, seed-to-seed standard deviation and standard error of the mean (0 for one)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "mean": None, "sd": None, "se": None}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "n": len(values),
        "mean": statistics.mean(values),
        "sd": sd,
        "se": sd / len(values) ** 0.5,
    }


def summarize(points: list[dict]) -> dict:
    """Per (method, target) and per design: CLIP and latency over seeds; each design's verdict
    against the evolved front; evolution vs Optuna vs random per target."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        key = (p["method"], p.get("target_ratio"), p["name"] if p["method"] == "design" else None)
        groups.setdefault(key, []).append(p)
    rows = []
    for (method, target, name), ps in groups.items():
        rows.append(
            {"method": method, "target_ratio": target, "name": name or method, "seeds": len(ps)}
            | {"clip": stats([p["clip"] for p in ps])}
            | {"latency_ms": stats([p["latency_ms"] for p in ps])}
            | {"measured_ms": stats([p["measured_ms"] for p in ps])}
            | {"target_met": _met(ps)}
        )
    evolved = [r for r in rows if r["method"] == "evolution"]
    verdicts = [verdict(d, evolved) for d in rows if d["method"] == "design"]
    versus = []
    for r in evolved:
        others = {o["method"]: o for o in rows if o["target_ratio"] == r["target_ratio"]}
        versus.append(
            {"target_ratio": r["target_ratio"]}
            | {f"evolution_minus_{m}": margin(r, others[m]) for m in SEARCHES[1:] if m in others}
        )
    return {"groups": rows, "designs": verdicts, "per_target": versus}


def _met(points: list[dict]) -> bool | None:
    """Whether every seed's network meets its target (None: a point with no target)."""
    if any(p.get("target_ms") is None for p in points):
        return None
    return all(p["latency_ms"] <= p["target_ms"] for p in points)


def margin(a: dict, b: dict) -> dict:
    """a's mean CLIP minus b's, and that in units of their combined standard error."""
    diff = a["clip"]["mean"] - b["clip"]["mean"]
    sigma = math.hypot(a["clip"]["se"], b["clip"]["se"])
    return {"clip": diff, "sigma": diff / sigma if sigma > 0 else None}


def verdict(design: dict, evolved: list[dict]) -> dict:
    """The design against the best evolved network as fast or faster (predicted latency,
    means over seeds): beaten if better by more than 2 combined standard errors, lost if
    worse by more, matched otherwise (and by sign alone with a single seed)."""
    faster = [e for e in evolved if e["latency_ms"]["mean"] <= design["latency_ms"]["mean"]]
    out = {"design": design["name"], "latency_ms": design["latency_ms"]["mean"]}
    out["clip"] = design["clip"]["mean"]
    if not faster:
        return out | {"verdict": "no evolved network as fast", "against": None, "margin": None}
    best = max(faster, key=lambda e: e["clip"]["mean"])
    m = margin(best, design)
    if m["sigma"] is None:
        v = "beaten" if m["clip"] > 0 else "matched" if m["clip"] == 0 else "lost"
    else:
        v = "beaten" if m["sigma"] > 2 else "lost" if m["sigma"] < -2 else "matched"
    against = {"target_ratio": best["target_ratio"], "latency_ms": best["latency_ms"]["mean"]}
    return out | {"verdict": v, "against": against | {"clip": best["clip"]["mean"]}, "margin": m}
