"""Racing: spend evaluation images where they decide something.

The evolution only needs to know which `keep` removals have the lowest value (paper Alg. 1
removes them); the exact value of a clearly useful block does not matter. Racing (successive
halving over images) scores every action on the first few images of the protocol, then
scores more images only for the actions whose value is near the cut, until the survivors
have been scored on all images:

    round 0: every action on `first` images
    round r: the `2 * keep` lowest-value actions on `first * growth**r` images (capped)

so an iteration of A actions on n images scores A * first + min(A, 2 * keep) * (n - first)
action-images (`raced_images`), whatever the scores: its compute is known before it runs.
It races any of the protocol's metrics (`nas.search.proxy.action_scorer`).

Every estimate stays paired: an action's ΔCLIP is always against the base architecture's
scores on the same images. Cost is counted in images generated (base + actions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from latency.predict import Predictor
from nas.search.evaluate import ActionScorer, ActionValue, action_value
from search_spaces import Architecture


@dataclass
class RaceResult:
    values: list[ActionValue]  # every action's value, from the images it was scored on
    images: dict[str, int]  # images each action was scored on
    cost: int  # images generated in all (base + actions)
    full_cost: int  # images the plain protocol would generate (every action on every image)


def raced_images(actions: int, images: int, keep: int, first: int) -> int:
    """Action-images racing scores in an iteration of `actions` actions on `images` images
    (the base architecture's not included)."""
    first = min(first, images)
    return actions * first + min(actions, 2 * keep) * (images - first)


def race(
    evaluator: ActionScorer,
    arch: Architecture,
    predictor: Predictor,
    keep: int,
    first: int = 4,
    growth: int = 4,
    kinds=("remove",),
    base: torch.Tensor | None = None,
    progress=None,
) -> RaceResult:
    """Values of every legal action of `kinds` from `arch`, the `2 * keep` lowest raced to
    all of the evaluator's images (see the module docstring). `base`: the per-image scores
    of `arch`, if already known; `progress()` is called once per action of the first round."""
    space = evaluator.supernet.space
    n = len(evaluator.prompts)
    base_ms = predictor.predict(arch).raw_ms
    if base is None:  # per image, all images: the reference of every pair
        base = evaluator.scores(arch)
    actions = [a for a in space.actions(arch) if a.kind in kinds]
    scores: dict[str, torch.Tensor] = {str(a): torch.empty(0) for a in actions}
    seconds = {str(a): 0.0 for a in actions}
    after_ms = {str(a): predictor.predict(arch.apply(a)).raw_ms for a in actions}
    cost = n

    def value(action) -> ActionValue:
        s = scores[str(action)]
        clip_after = float(s.mean())
        clip_base = float(base[: len(s)].mean())
        return action_value(
            action,
            clip_base,
            clip_after,
            base_ms,
            after_ms[str(action)],
            seconds[str(action)],
            cost=evaluator.protocol.score_cost(len(s)),
        )

    alive, upto = actions, min(first, n)
    while alive:
        for a in alive:
            done = len(scores[str(a)])
            start = time.perf_counter()
            new = evaluator.scores(arch.apply(a), done, upto)
            seconds[str(a)] += time.perf_counter() - start
            scores[str(a)] = torch.cat([scores[str(a)], new])
            cost += len(new)
            if progress is not None and done == 0:
                progress()
        if upto >= n:
            break
        ranked = sorted(alive, key=lambda a: value(a).value)
        alive, upto = ranked[: 2 * keep], min(upto * growth, n)
    values = [value(a) for a in actions]
    images = {str(a): len(scores[str(a)]) for a in actions}
    return RaceResult(values, images, cost, n * (len(actions) + 1))
