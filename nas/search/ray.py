"""Action evaluation on Ray: a pool of evaluator actors (docs/distributed.md).

Scoring an action means generating images with the supernet in the architecture after the
action and CLIP-scoring them: hours per action on Stable Diffusion, and every action of an
iteration is independent. `RayEvaluator` spreads them over a pool of Ray actors, each of which
holds its own copy of the world (CLIP scorer, text conditions and features, initial noises,
supernet: an `Evaluator` built by a small picklable recipe, e.g. `open_evaluator(exp)`), on
one GPU when the cluster has GPUs and on one CPU with one torch thread otherwise.

Per iteration the supernet's weights go into the object store once (`ray.put`); every task
carries the weights' version, and an actor whose copy is older loads them first (so a
restarted actor catches up by itself). An actor scores `Evaluator.clip_score(arch.apply(a))`,
exactly what the in-process evaluator does; the driver turns scores into `ActionValue`s with
the same `action_value`, so the values equal in-process evaluation's to float tolerance.

An actor that dies mid-evaluation (its process killed) is restarted by Ray (up to
`max_restarts` times) and the action it was scoring is run again there; an actor gone for good
(past its restarts, its node lost) has its action sent to another actor.

`RayEvaluator` has the in-process `Evaluator`'s interface (`evaluate`, `clip_score`, `images`,
`prompts`), so the evolution runs on either unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from latency.backends.torch_backend import keep_heap
from latency.predict import Predictor
from nas.cluster import ENV_FORWARDED, RayCluster
from nas.search.evaluate import ActionValue, Evaluator, action_value
from search_spaces import Architecture, UserError

log = logging.getLogger(__name__)


def _short(error: BaseException, lines: int = 30) -> str:
    """The end of an error's text (a Ray actor error holds the actor's whole traceback)."""
    text = str(error).strip().splitlines()
    return "\n".join(text[-lines:])


# -- the actors ----------------------------------------------------------------------------------


class EvaluatorActor:
    """One worker of the pool (made a Ray actor by `RayEvaluator`): an `Evaluator` of its own,
    built from the recipe, and the supernet weights of the version last asked for."""

    def __init__(
        self, recipe: Callable[[], Evaluator], env: dict[str, str], gpu: bool, threads: int
    ):
        os.environ.update(env)
        if threads:
            torch.set_num_threads(threads)
        # as the driver, which kept its heap when it built or opened the latency table:
        # otherwise every CPU forward here pays page faults on freshly mapped activations,
        # and one actor scored 16-21% slower than the same evaluation in process
        self.heap_kept = not gpu and keep_heap()
        self.evaluator = recipe()
        if gpu:
            self.evaluator.to("cuda")
        self.version = -1

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node": ctx.get_node_id(),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
            "heap_kept": self.heap_kept,
        }

    def score(self, version: int, weights: list, arch: Architecture) -> tuple[float, float, str]:
        """(CLIP score of `arch`, seconds, node id) with the weights of `version`."""
        import ray

        start = time.perf_counter()
        if version != self.version:
            counts, state = ray.get(weights[0])  # in a list: Ray does not fetch it for us
            supernet = self.evaluator.supernet
            supernet.ensure_copies(counts)
            supernet.load_state_dict(state)
            self.version = version
        clip = self.evaluator.clip_score(arch)
        return clip, time.perf_counter() - start, ray.get_runtime_context().get_node_id()


@dataclass
class Placement:
    """Where one action was scored (for logs and tests)."""

    action: str
    node: str
    attempts: int  # sent this many times (Ray's own retries on a restarted actor not counted)


class RayEvaluator:
    """Drop-in for `Evaluator` whose scoring runs on a pool of Ray actors.

    `local` is the driver's evaluator: its supernet is the one the search trains (its weights
    are shipped to the actors), and it draws the final image grids. `recipe()` builds an
    equivalent `Evaluator` in each actor (it must be picklable: a module-level function or a
    `functools.partial` of one).
    """

    def __init__(
        self,
        local: Evaluator,
        recipe: Callable[[], Evaluator],
        cluster: RayCluster,
    ):
        import ray

        self.local, self.cluster = local, cluster
        spec = cluster.spec
        self.max_restarts = spec.max_restarts
        resources = {"num_gpus": 1} if cluster.use_gpu else {"num_cpus": 1}
        actor_class = ray.remote(EvaluatorActor).options(
            max_restarts=spec.max_restarts, max_task_retries=spec.max_restarts, **resources
        )
        env = {k: os.environ[k] for k in ENV_FORWARDED if k in os.environ}
        threads = 0 if cluster.use_gpu else 1
        # created now, loading their worlds while the driver goes on (e.g. trains)
        self.actors = [
            actor_class.remote(recipe, env, cluster.use_gpu, threads) for _ in range(spec.workers)
        ]
        self.dead: set[int] = set()  # actors gone for good (past their restarts)
        self.placements: list[Placement] = []  # of the last evaluate()
        self._version, self._fingerprint, self._weights = -1, None, None

    # -- the Evaluator interface ---------------------------------------------------------------

    @property
    def prompts(self) -> list[str]:
        return self.local.prompts

    @property
    def supernet(self):
        return self.local.supernet

    @property
    def protocol(self):
        return self.local.protocol

    def prepare(self, arch: Architecture) -> None:
        """Nothing to prepare: the actors sample (metric sample_clip; the x0 metrics run in
        process, `nas.search.run.run_search` refuses them with Ray)."""

    def score(self, arch: Architecture) -> float:
        return self.clip_score(arch)

    def images(self, arch: Architecture, n: int) -> torch.Tensor:
        return self.local.images(arch, n)

    def clip_score(self, arch: Architecture) -> float:
        """CLIP score of `arch`, on an actor (the same device as the actions' scores)."""
        return self._run([arch])[0][0]

    def evaluate(
        self,
        arch: Architecture,
        predictor: Predictor,
        kinds=("remove",),
        base_clip: float | None = None,
        progress=None,
    ) -> list[ActionValue]:
        """ΔCLIP, ΔLatency and value of every legal action of `kinds` from `arch`, the actions
        scored in parallel on the pool; as `Evaluator.evaluate`, in the same order."""
        space = self.local.supernet.space
        actions = [a for a in space.actions(arch) if a.kind in kinds]
        archs = [arch.apply(a) for a in actions]
        if base_clip is None:
            actions, archs = [None, *actions], [arch, *archs]
        first = 0 if base_clip is not None else 1  # progress counts actions, as in process
        done = None if progress is None else (lambda i: progress() if i >= first else None)
        scores = self._run(archs, done, [str(a) if a else "the architecture" for a in actions])
        if base_clip is None:
            base_clip, scores, actions, archs = scores[0][0], scores[1:], actions[1:], archs[1:]
        base_ms = predictor.predict(arch).raw_ms
        cost = self.local.protocol.score_cost(len(self.prompts))
        return [
            action_value(
                a, base_clip, clip, base_ms, predictor.predict(after).raw_ms, sec, node, cost
            )
            for a, after, (clip, sec, node) in zip(actions, archs, scores, strict=True)
        ]

    # -- the pool ------------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """Each actor's node id, process id and torch threads (starts them if need be)."""
        import ray

        return ray.get([a.where.remote() for a in self.actors])

    def _sync_weights(self) -> None:
        """Put the driver's supernet weights in the object store if they changed since the
        last time (once per iteration: training changes them, evaluation does not)."""
        import ray

        supernet = self.local.supernet
        state = supernet.state_dict()
        counts = supernet.copy_counts()
        # a checksum of the contents (tensor version counters would miss fused optimizers)
        with torch.no_grad():
            sums = [v.detach().double().sum() for v in state.values()]
        fingerprint = (
            tuple(sorted(counts.items())),
            tuple(state),
            torch.stack(sums).cpu().numpy().tobytes() if sums else b"",
        )
        if fingerprint == self._fingerprint:
            return
        cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self._weights = ray.put((counts, cpu))
        self._version += 1
        self._fingerprint = fingerprint

    def _run(self, archs: list[Architecture], done=None, labels=None) -> list[tuple]:
        """(clip, seconds, node) of each architecture, scored on the pool (`done(i)` after the
        i-th): one task per actor at a time, the next handed to whichever finishes first. Ray
        restarts an actor that died and re-runs its task there (max_restarts,
        max_task_retries); a task whose actor is gone for good (past its restarts, its node
        lost) is sent to another actor."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        self._sync_weights()
        labels = labels or [str(a.hash) for a in archs]
        queue = deque(range(len(archs)))
        results: list[tuple | None] = [None] * len(archs)
        attempts = [0] * len(archs)
        running: dict = {}  # ObjectRef -> (index, actor)
        limit = (self.max_restarts + 2) * len(self.actors)  # tries of one action at most

        def submit(actor: int) -> None:
            if queue and actor not in self.dead:
                i = queue.popleft()
                attempts[i] += 1
                ref = self.actors[actor].score.remote(self._version, [self._weights], archs[i])
                running[ref] = (i, actor)

        for actor in range(len(self.actors)):
            submit(actor)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            i, actor = running.pop(ref)
            try:
                results[i] = ray.get(ref)
            except RayActorError as e:
                gone = isinstance(e, ActorDiedError)
                if gone:
                    self.dead.add(actor)
                log.warning(
                    "evaluator actor %d failed while scoring %s (%s); %s",
                    actor,
                    labels[i],
                    type(e).__name__,
                    "it is gone: its action goes to another actor" if gone else "retrying",
                )
                if len(self.dead) == len(self.actors) or attempts[i] >= limit:
                    raise UserError(
                        f"the evaluator actors died while scoring {labels[i]} (max_restarts="
                        f"{self.max_restarts} each); go on with --resume once the cause is "
                        f"fixed. The last one's error:\n{_short(e)}"
                    ) from e
                queue.appendleft(i)
                busy = {a for _, a in running.values()}
                for other in [actor, *range(len(self.actors))]:  # an idle live actor takes it
                    if other not in busy and other not in self.dead:
                        submit(other)
                        break
                continue
            submit(actor)  # first: the actor works on while the driver reports
            if done is not None:
                done(i)
        self.placements = [
            Placement(labels[i], results[i][2], attempts[i]) for i in range(len(archs))
        ]
        return results

    def close(self) -> None:
        """Stop the actors (the cluster connection is `RayCluster.close`'s)."""
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor)
        self.actors, self._weights = [], None
