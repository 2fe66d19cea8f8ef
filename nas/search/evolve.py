"""Architecture evolution (paper Alg. 1), resumable, writing a run directory.

    repeat:
        robust training for `train_steps`
        evaluate every removal: ΔCLIP (paired, same noises), ΔLatency (lookup table)
        if predicted latency > target: remove the `group_size` blocks of lowest value
        else: copy the most valuable blocks while the target stays met
    until latency <= target and no copy fits, or `max_iterations`

Each iteration draws its randomness from (seed, iteration) and ends with a checkpoint, so
a run killed at any point and resumed ends with the same architecture as one never killed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from latency.predict import Predictor
from nas.experiment import Experiment
from nas.search.evaluate import ActionValue, Cost, Evaluator
from nas.search.proxy import action_scorer
from nas.search.racing import race
from nas.supernet import ElasticUNet
from search_spaces import Action, Architecture, SearchSpace, UserError

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
GRID = 16  # images per grid of the original and the found network
STATE = "state.json"


@dataclass
class SearchResult:
    arch: Architecture
    latency_ms: float
    target_ms: float
    clip: float
    iterations: int
    run_dir: Path


def smallest_latency(space: SearchSpace, predictor: Predictor) -> tuple[Architecture, float]:
    """A near-smallest reachable latency: greedily remove the costliest legal blocks."""
    arch = space.original()
    while True:
        removals = [a for a in space.actions(arch) if a.kind == "remove"]
        if not removals:
            return arch, predictor.predict(arch).total_ms
        best = max(removals, key=lambda a: predictor.block_ms(a.slot))
        arch = arch.apply(best)


def resolve_target(exp: Experiment, space: SearchSpace, predictor: Predictor) -> float:
    original = predictor.predict(space.original()).total_ms
    target = exp.target.ms if exp.target.ms is not None else exp.target.ratio * original
    _, smallest = smallest_latency(space, predictor)
    if target < smallest:
        raise UserError(
            f"target {target:.2f} ms cannot be reached in space {space.name!r} on "
            f"{predictor.device}: the smallest reachable latency is about {smallest:.2f} ms "
            f"(original {original:.2f} ms, ratio {smallest / original:.2f})"
        )
    return target


class RunDir:
    """runs/<name>/: experiment, space, table snapshot, history, checkpoints, result."""

    def __init__(self, path: Path):
        self.path = path

    def create(self, exp: Experiment, space: SearchSpace, table_rows: list[dict]) -> None:
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(
                f"run directory {self.path} exists; resume it with --resume {self.path}, "
                "or choose another --name"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "experiment.yaml").write_text(
            yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
        )
        (self.path / "experiment.hash").write_text(exp.content_hash() + "\n")
        (self.path / "space.json").write_text(
            json.dumps(space.spec.model_dump(mode="json"), indent=2)
        )
        (self.path / "table.json").write_text(json.dumps(table_rows, indent=1))

    def check_same(self, exp: Experiment) -> None:
        stored = self.path / "experiment.hash"
        if not stored.is_file():
            raise UserError(f"{self.path} is not a diffnas run directory (no experiment.hash)")
        if stored.read_text().strip() != exp.content_hash():
            raise UserError(
                f"{self.path} holds another experiment (its experiment.yaml differs from this "
                "one); resume with the same experiment file and flags, or start a new --name"
            )

    def history(self) -> list[dict]:
        f = self.path / HISTORY
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    def save_iteration(self, record: dict, model: ElasticUNet) -> None:
        """Checkpoint after an iteration, then append its record (the record marks it done)."""
        tmp = self.path / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp / "model")
        state = {
            "iteration": record["iteration"],
            "arch": record["arch_after"],
            "rng": torch.get_rng_state().tolist(),
        }
        (tmp / STATE).write_text(json.dumps(state))
        final = self.path / "checkpoint"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        with open(self.path / HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")

    def load_checkpoint(self, model: ElasticUNet) -> tuple[int, Architecture]:
        """Weights and architecture after the last completed iteration (-1: none)."""
        done = self.history()
        ckpt = self.path / "checkpoint"
        if not done or not (ckpt / STATE).is_file():
            return -1, model.space.original()
        state = json.loads((ckpt / STATE).read_text())
        if state["iteration"] != done[-1]["iteration"]:  # killed between the two writes
            done = done[: state["iteration"] + 1]
            (self.path / HISTORY).write_text("".join(json.dumps(r) + "\n" for r in done))
        saved = ElasticUNet.from_pretrained(ckpt / "model")
        arch = Architecture.from_dict(state["arch"])
        model.ensure_copies(saved.copy_counts())
        model.load_state_dict(saved.state_dict())
        model.set_architecture(arch)
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        return state["iteration"], arch


def evolve(
    exp: Experiment,
    model: ElasticUNet,
    evaluator: Evaluator,
    predictor: Predictor,
    robust_train: Callable[[ElasticUNet, int, int], object],
    run: RunDir,
    target_ms: float,
    progress: bool = True,
) -> SearchResult:
    """Run (or continue) the evolution of `model`'s architecture towards `target_ms`.

    `robust_train(model, steps, seed)` trains the supernet in its current architecture (the
    world knows its data, encoders and loss: see `nas.search.run`).
    """
    space, s = model.space, exp.search
    scorer = action_scorer(evaluator)  # the protocol's metric (nas.search.proxy)
    last, arch = run.load_checkpoint(model)
    converged = bool(run.history()) and run.history()[-1].get("converged", False)
    it = last + 1
    while it < s.max_iterations and not converged:
        start = time.perf_counter()
        torch.manual_seed(exp.seed * 1000 + it)
        model.set_architecture(arch)
        if s.train_steps:
            model.train()
            robust_train(model, s.train_steps, exp.seed * 1000 + it)
        model.eval()
        removals = [a for a in space.actions(arch) if a.kind == "remove"]
        with tqdm(
            total=len(removals),
            desc=f"iteration {it}: evaluating actions",
            disable=not progress,
            leave=False,
        ) as bar:
            images = None  # images each action was scored on, when racing
            scorer.prepare(arch)  # the x0 metrics: the current network's samples, noised
            if exp.evaluation.racing:
                base = scorer.scores(arch)
                base_score = float(base.mean())
                race_ = race(
                    scorer,
                    arch,
                    predictor,
                    s.group_size,
                    exp.evaluation.racing,
                    base=base,
                    progress=bar.update,
                )
                values, images = race_.values, race_.images
            else:
                base_score = scorer.score(arch)
                values = scorer.evaluate(arch, predictor, ("remove",), base_score, bar.update)
        # the iteration's CLIP: of the current network's samples (the x0 metrics drew them)
        base_clip = base_score if scorer is evaluator else scorer.sample_clip
        compute = iteration_compute(scorer.protocol, len(scorer.prompts), values)
        latency = predictor.predict(arch).total_ms
        rules = []  # why each removal was chosen
        if latency > target_ms:
            changed, rules = _remove(space, arch, values, s.group_size, predictor, target_ms)
            decision = "remove"
        elif s.copy_blocks:
            decision, changed = (
                "copy",
                _copy(space, arch, values, s.group_size, predictor, target_ms),
            )
        else:
            decision, changed = "stop", []
        after = arch
        for action in changed:
            after = after.apply(action)
        converged = latency <= target_ms and not changed
        record = {
            "iteration": it,
            "arch": arch.to_dict(),
            "arch_hash": arch.hash,
            "latency_ms": latency,
            "target_ms": target_ms,
            "clip": base_clip,
            "metric": scorer.protocol.metric,
            "score": base_score,  # of the current network under the metric (sample_clip: CLIP)
            "actions": [v.to_dict() for v in values],
            "images": images,
            "compute": compute,
            "decision": decision,
            "applied": [str(a) for a in changed],
            "rules": rules,
            "arch_after": after.to_dict(),
            "latency_after_ms": predictor.predict(after).total_ms,
            "converged": converged,
            "seconds": time.perf_counter() - start,
        }
        model.set_architecture(after)
        run.save_iteration(record, model)
        log.info(
            "iteration %d: %.2f ms, CLIP %.2f, %s %s",
            it,
            latency,
            base_clip,
            decision,
            ", ".join(record["applied"]) or "-",
        )
        if progress:
            print(
                f"iteration {it}: {latency:.2f} ms (target {target_ms:.2f}), CLIP "
                f"{base_clip:.2f}; {decision}: {', '.join(record['applied']) or 'nothing'}",
                flush=True,
            )
        arch = after
        it += 1
    return _finish(model, evaluator, predictor, run, arch, target_ms, it)


def iteration_compute(protocol, n: int, values: list[ActionValue]) -> dict:
    """An iteration's evaluation compute: the current network (`Protocol.reference_cost`)
    and each action (recorded in its ActionValue), in UNet calls and images."""
    reference = protocol.reference_cost(n)
    actions = Cost(sum(v.unet_calls for v in values), sum(v.images for v in values))
    total = reference + actions
    return {
        "unet_calls": total.unet_calls,
        "images": total.images,
        "reference": reference.to_dict(),
        "actions": actions.to_dict(),
        "n_actions": len(values),
    }


def run_compute(history: list[dict]) -> dict | None:
    """The search's evaluation compute, summed over iterations (None: a history recorded
    before compute was)."""
    if not history or any("compute" not in h for h in history):
        return None
    calls = sum(h["compute"]["unet_calls"] for h in history)
    images = sum(h["compute"]["images"] for h in history)
    actions = sum(h["compute"]["n_actions"] for h in history)
    return {
        "unet_calls": calls,
        "images": images,
        "iterations": len(history),
        "actions": actions,
        "unet_calls_per_action": calls / actions if actions else None,
        # wall time scoring actions (the current network's not included), and of the whole
        # iterations (robust training too)
        "action_seconds": sum(a["seconds"] for h in history for a in h["actions"]),
        "iteration_seconds": sum(h["seconds"] for h in history),
    }


def _remove(
    space, arch, values: list[ActionValue], n, predictor, target_ms
) -> tuple[list[Action], list[str]]:
    """Up to n removals, legality re-checked after each, stopping once the target is met,
    and the rule that chose each.

    Each pick is the lowest-value legal removal, unless a removal that meets the target by
    itself loses no more CLIP than that one (the lowest-value one included, when it meets the
    target): then it is the one of those that loses least. The lowest value (CLIP per ms)
    favours expensive blocks, so near the target it would take out a costly block and land
    far past the target, losing CLIP for latency nobody asked for. A removal that meets the
    target but loses more than the lowest-value one is not taken: one more iteration of cheap
    removals costs less CLIP than one costly block."""
    chosen, rules, current = [], [], arch
    while len(chosen) < n and predictor.predict(current).total_ms > target_ms:
        legal = [
            v
            for v in values
            if current[v.slot] > 0 and not space.violations(current.apply(Action("remove", v.slot)))
        ]
        if not legal:
            break
        lowest = min(legal, key=lambda v: v.value)
        landing = [
            v
            for v in legal
            if v.clip >= lowest.clip
            and predictor.predict(current.apply(Action("remove", v.slot))).total_ms <= target_ms
        ]
        if landing:
            pick, rule = max(landing, key=lambda v: v.clip), "meets the target, least CLIP loss"
        else:
            pick, rule = lowest, "lowest value"
        action = Action("remove", pick.slot)
        chosen.append(action)
        rules.append(rule)
        current = current.apply(action)
    return chosen, rules


def _copy(space, arch, values, n, predictor, target_ms) -> list[Action]:
    """Copies of the most valuable blocks, while the target stays met."""
    chosen, current = [], arch
    for v in sorted(values, key=lambda v: -v.value):
        if len(chosen) == n:
            break
        action = Action("copy", v.slot)
        after = current.apply(action)
        if space.violations(after) or predictor.predict(after).total_ms > target_ms:
            continue
        chosen.append(action)
        current = after
    return chosen


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    from torchvision.utils import save_image

    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)


def _finish(model, evaluator, predictor, run: RunDir, arch, target_ms, iterations):
    model.set_architecture(arch)
    arch.save(run.path / "final.arch.json")
    if not (run.path / "final").exists():
        model.save_pretrained(run.path / "final")
    result_file = run.path / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        original = model.space.original()
        found, orig = predictor.predict(arch), predictor.predict(original)
        result = {
            "arch_hash": arch.hash,
            "latency_ms": found.total_ms,
            "target_ms": target_ms,
            "target_met": found.total_ms <= target_ms,
            "clip": evaluator.clip_score(arch),
            "original_clip": evaluator.clip_score(original),
            "original_ms": orig.total_ms,
            "iterations": iterations,
            "per_stage": {"original": orig.per_stage, "found": found.per_stage},
            "fixed_ms": found.fixed_ms,
            "counts": {"original": model.space.counts(original), "found": model.space.counts(arch)},
            "params": {"original": model.space.params(original), "found": model.space.params(arch)},
            "prompts": evaluator.prompts[:GRID],
            "evaluation_compute": run_compute(run.history()),
        }
        for name, a in (("original", original), ("found", arch)):
            save_grid(evaluator.images(a, GRID), run.path / f"grid_{name}.png")
        result_file.write_text(json.dumps(result, indent=2) + "\n")
    return SearchResult(
        arch, result["latency_ms"], target_ms, result["clip"], result["iterations"], run.path
    )
