"""`diffnas plan EXPERIMENT` (`diffnas search --dry-run`): what a search will cost, before it
runs (docs/evaluation-cost.md).

A search's evaluation compute is known before any image is drawn, but for one thing: which
blocks it removes. An iteration scores the current network (`Protocol.reference_cost`) and
every legal removal (`Protocol.score_cost` on each action's images: all of them, or what
racing scores, `nas.search.racing.raced_images`, which does not depend on the scores either). How
many iterations, and how many actions each, depends on the removal order, which the scores
decide. The plan walks the space to the target along the orders that bound it:

- `fewest`: the costliest legal block first (the fewest iterations), no copy afterwards;
- `typical`: random legal removals (the median of `walks` seeded walks), then random copies
  while the target stays met, as many per iteration as the evolution copies;
- `most`: the cheapest block first (the most iterations), then the cheapest copies;

each capped at `search.max_iterations`, each ending with the iteration that finds nothing
more to do (it scores its actions too). Compute is in UNet calls of one latent (a guided step
of one image: two) and images decoded and CLIP-scored; with a per-call time (measured on the
device: `Timing`) also in device hours. The per-call time of the original network is used for
every iteration, so hours are an upper bound: the networks get faster as blocks go.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latency.predict import Predictor
from nas.experiment import Experiment
from nas.search.evaluate import Cost, Protocol
from nas.search.racing import raced_images
from nas.search.run import evaluation_protocol
from search_spaces import Action, Architecture, SearchSpace, UserError


@dataclass
class Timing:
    """Device seconds per UNet call of one latent and per image (decoding and CLIP)."""

    per_call_s: float  # one latent through the UNet once
    per_image_s: float = 0.0  # decoding one image and scoring it with CLIP
    source: str = "given"  # where the numbers come from

    @classmethod
    def from_action_benchmark(cls, path: str | Path, precision: str = "fp16") -> Timing:
        """From `experiments/benchmarks/sd15_action.py`'s JSON: the UNet's milliseconds per
        sampler step of a batch (guided: twice the batch's latents), and the batch's VAE
        decoding and CLIP time per image."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            r = data["results"][precision]
            parts = r["batch_parts_s"]
            latents = parts["images"] * (2 if data["protocol"]["cfg"] != 1 else 1)
            per_call = r["ms_per_unet_step_in_ddim"] / 1000 / latents
            per_image = (parts["vae_decode"] + parts["clip"]) / parts["images"]
        except FileNotFoundError:
            raise UserError(f"timing file {str(path)!r} does not exist") from None
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise UserError(
                f"{path}: not an sd15_action.py result with {precision} timings (results."
                f"{precision}.ms_per_unet_step_in_ddim, batch_parts_s)"
            ) from None
        gpu = data.get("gpu") or data.get("device", "?")
        return cls(per_call, per_image, f"{path.name} ({precision}, {gpu})")


@dataclass
class PathPlan:
    """One removal order's projection."""

    name: str
    actions: list[int]  # legal removals scored in each iteration
    removals: int  # blocks removed on the way
    copies: int  # blocks copied once within the target
    unet_calls: int = 0
    images: int = 0
    reaches_target: bool = True  # False: max_iterations ends it first

    @property
    def iterations(self) -> int:
        return len(self.actions)


@dataclass
class Plan:
    experiment: str
    space: str
    device: str
    original_ms: float
    target_ms: float
    protocol: dict  # what an action is scored with
    per_action: dict  # Cost of one action scored on every image
    per_iteration_reference: dict  # Cost of the current network, once per iteration
    paths: dict[str, PathPlan] = field(default_factory=dict)
    timing: Timing | None = None
    walks: int = 0  # random walks behind `typical`
    typical_range: tuple[int, int] | None = None  # iterations over the walks

    def hours(self, path: str) -> float | None:
        if self.timing is None:
            return None
        p = self.paths[path]
        t = self.timing
        return Cost(p.unet_calls, p.images).seconds(t.per_call_s, t.per_image_s) / 3600

    def to_dict(self) -> dict:
        out = asdict(self)
        for name, p in self.paths.items():
            out["paths"][name]["iterations"] = p.iterations
            out["paths"][name]["hours"] = self.hours(name)
        return out


def iteration_cost(protocol: Protocol, actions: int, racing: int, keep: int) -> Cost:
    """Compute of one iteration with `actions` legal removals: the current network, then each
    action on every image, or on what racing from `racing` images scores."""
    n = protocol.images
    scored = raced_images(actions, n, keep, racing) if racing else actions * n
    return protocol.reference_cost(n) + protocol.score_cost(scored)


def _legal(space: SearchSpace, arch: Architecture, kind: str) -> list[Action]:
    return [
        a for a in space.actions(arch) if a.kind == kind and not space.violations(arch.apply(a))
    ]


def walk(space, predictor: Predictor, exp: Experiment, target_ms: float, order: str, seed=0):
    """Actions per iteration along one removal order (see the module docstring), removals
    and copies made, and whether the target was reached within max_iterations."""
    s, rng = exp.search, random.Random(seed)
    ms = lambda a: predictor.predict(a).total_ms  # noqa: E731

    def pick(options: list[Action], arch: Architecture) -> Action:
        if order == "typical":
            return rng.choice(options)
        gain = {a: ms(arch) - ms(arch.apply(a)) for a in options}
        return (max if order == "fewest" else min)(options, key=lambda a: abs(gain[a]))

    arch, actions, removed, copied = space.original(), [], 0, 0
    while len(actions) < s.max_iterations:
        actions.append(len(_legal(space, arch, "remove")))
        changed = 0
        if ms(arch) > target_ms:
            while changed < s.group_size and ms(arch) > target_ms:
                legal = _legal(space, arch, "remove")
                if not legal:
                    break
                arch, changed, removed = arch.apply(pick(legal, arch)), changed + 1, removed + 1
        elif s.copy_blocks and order != "fewest":
            while changed < s.group_size:
                fits = [a for a in _legal(space, arch, "copy") if ms(arch.apply(a)) <= target_ms]
                if not fits:
                    break
                arch, changed, copied = arch.apply(pick(fits, arch)), changed + 1, copied + 1
        if ms(arch) <= target_ms and not changed:
            return actions, removed, copied, True
    return actions, removed, copied, ms(arch) <= target_ms


def cost_protocol(exp) -> Protocol:
    """The experiment's evaluation protocol as far as its compute goes: the search's own, with
    blank prompts (what they say costs nothing to count)."""
    return evaluation_protocol(exp, None, [""] * exp.evaluation.prompts)


def make_plan(
    exp: Experiment,
    space: SearchSpace,
    predictor: Predictor,
    target_ms: float,
    timing: Timing | None = None,
    walks: int = 20,
) -> Plan:
    """The projection of `exp`'s search in `space` to `target_ms` (module docstring)."""
    e = exp.evaluation
    protocol = cost_protocol(exp)
    plan = Plan(
        experiment=exp.name,
        space=space.name,
        device=predictor.device,
        original_ms=predictor.predict(space.original()).total_ms,
        target_ms=target_ms,
        protocol={
            "images": protocol.images,
            "sampler": e.sampler,
            "steps": e.steps,
            "cfg": e.cfg,
            "metric": e.metric,
            "timesteps": list(protocol.timesteps) if protocol.timesteps else None,
            "racing": e.racing,
            "group_size": exp.search.group_size,
        },
        per_action=protocol.score_cost(protocol.images).to_dict(),
        per_iteration_reference=protocol.reference_cost(protocol.images).to_dict(),
        timing=timing,
        walks=walks,
    )
    runs = {"fewest": [walk(space, predictor, exp, target_ms, "fewest")]}
    runs["most"] = [walk(space, predictor, exp, target_ms, "most")]
    runs["typical"] = [walk(space, predictor, exp, target_ms, "typical", i) for i in range(walks)]
    for name, found in runs.items():
        found = sorted(found, key=lambda r: len(r[0]))
        actions, removed, copied, reached = found[len(found) // 2]  # the median walk
        cost = Cost()
        for a in actions:
            cost = cost + iteration_cost(protocol, a, e.racing, exp.search.group_size)
        plan.paths[name] = PathPlan(
            name, actions, removed, copied, cost.unet_calls, cost.images, reached
        )
        if name == "typical":
            lengths = [len(r[0]) for r in found]
            plan.typical_range = (min(lengths), max(lengths))
    return plan


def describe(plan: Plan) -> str:
    """The plan as `diffnas plan` prints it."""
    p = plan.protocol
    how = f"{p['metric']}, {p['images']} images, {p['sampler']} {p['steps']} steps, cfg {p['cfg']}"
    if p["timesteps"]:
        how += f", x0 timesteps {p['timesteps']}"
    if p["racing"]:
        how += f", racing from {p['racing']} images"
    a, r = plan.per_action, plan.per_iteration_reference
    lines = [
        f"experiment {plan.experiment}: space {plan.space} on {plan.device}, original "
        f"{plan.original_ms:.2f} ms, target {plan.target_ms:.2f} ms",
        f"protocol: {how}",
        f"per action (every image): {a['unet_calls']:,} UNet calls, {a['images']:,} images; "
        f"per iteration, the current network: {r['unet_calls']:,} calls, {r['images']:,} images",
        "iterations to the target (the scores decide the removal order; these bound it):",
    ]
    for name, why in (
        ("fewest", "costliest block first"),
        ("typical", f"median of {plan.walks} random orders"),
        ("most", "cheapest block first"),
    ):
        path = plan.paths[name]
        shown = ",".join(map(str, path.actions))
        extra = (
            f", range {plan.typical_range[0]}-{plan.typical_range[1]}" if name == "typical" else ""
        )
        hours = plan.hours(name)
        cost = f"{path.unet_calls:,} UNet calls, {path.images:,} images" + (
            f", {hours:.3g} device-hours" if hours is not None else ""
        )
        reached = "" if path.reaches_target else " (max_iterations first: target not reached)"
        lines.append(
            f"  {name:8s} {path.iterations:3d} iterations ({why}{extra}){reached}: actions "
            f"per iteration {shown}; {path.removals} removals, {path.copies} copies; {cost}"
        )
    if plan.timing is not None:
        t = plan.timing
        lines.append(
            f"device time: {1000 * t.per_call_s:.3g} ms per UNet call, {1000 * t.per_image_s:.3g}"
            f" ms per image ({t.source}); the original network's, so an upper bound"
        )
    else:
        lines.append("device time: give --timing FILE or --seconds-per-call for hours")
    return "\n".join(lines)
