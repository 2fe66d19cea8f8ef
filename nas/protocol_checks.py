"""The evaluation protocol's rules, checked when an experiment file is read (before anything
is built, without importing torch): the samplers and the steps they take, the one-call
metrics and their timesteps (docs/evaluation-cost.md)."""

from __future__ import annotations

from search_spaces import UserError

# Timesteps of the training schedule: SD-v1.5's and the tiny world's (the bound an experiment
# file's step counts and proxy timesteps are checked against when it is read; a world whose
# scheduler says otherwise is checked again when the evaluator is built)
SCHEDULE_TIMESTEPS = 1000
# sampler -> fewest steps it takes. DPM-Solver++ 2M is a second-order multistep solver: with
# one step it is DDIM's single step, so it takes two or more
SAMPLER_MIN_STEPS = {"ddim": 1, "dpm_solver": 2}
METRICS = ("sample_clip", "x0_clip", "x0_distance")
PROXY_TIMESTEPS = (250, 500, 750)  # the x0 metrics' default timesteps


def check_steps(sampler: str, steps: int, timesteps: int = SCHEDULE_TIMESTEPS) -> None:
    """A sampler and a step count it accepts: at least its fewest, at most the schedule's
    timesteps (DPM-Solver past them returns NaN without a word; DDIM refuses)."""
    if sampler not in SAMPLER_MIN_STEPS:
        raise UserError(f"sampler {sampler!r} is not one of {', '.join(SAMPLER_MIN_STEPS)}")
    if steps < SAMPLER_MIN_STEPS[sampler]:
        if sampler == "dpm_solver":
            raise UserError(
                f"steps={steps}: dpm_solver (DPM-Solver++ 2M, a second-order multistep solver) "
                "takes at least 2 steps; with one it is DDIM's single step: use sampler ddim"
            )
        raise UserError(f"steps={steps}: {sampler} needs at least one step")
    if steps > timesteps:
        raise UserError(
            f"steps={steps}: more than the {timesteps} timesteps of the training schedule"
        )


def check_timesteps(timesteps, schedule: int = SCHEDULE_TIMESTEPS) -> None:
    """The x0 metrics' timesteps: distinct, each in the training schedule [0, schedule)."""
    if not timesteps:
        raise UserError("timesteps: give at least one (e.g. [250, 500, 750])")
    outside = [t for t in timesteps if not 0 <= t < schedule]
    if outside:
        raise UserError(
            f"timesteps {outside}: outside the training schedule's timesteps 0..{schedule - 1}"
        )
    if len(set(timesteps)) != len(timesteps):
        raise UserError(f"timesteps {list(timesteps)}: give each at most once")
