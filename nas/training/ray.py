"""Robust training on Ray Train: the loop of `nas.training.robust.train`, data-parallel over
workers.

The paper trained its supernet on 16-32 nodes of 8 GPUs. Here each Ray Train worker runs
`nas.training.robust.train` itself, as one `Parallel` part of the run (`TorchTrainer`, DDP;
gloo on CPU, NCCL on GPU):

- every worker draws the same batch indices, noise, timesteps, CFG drops and block skips
  (from streams seeded by the run's seed, never by the worker's rank, and restored alike from
  a checkpoint), then keeps its own slice of the batch: `TrainConfig.batch_size` is the
  combined batch, split evenly; each step checks that all workers skipped the same blocks;
- DDP averages the gradients, so a step updates the weights as one process training on the
  whole batch would (to float reduction order); the number of workers changes the speed,
  not the run;
- skipped blocks are not in the autograd graph: DDP runs with `find_unused_parameters=True`,
  which leaves their gradients unset (zeroing them instead would let AdamW's weight decay and
  momentum move blocks the step did not use, unlike training in one process);
- rank 0 writes the checkpoint (the same folder as in-process training's: `model/` +
  `state.pt`) and hands it to Ray Train with `ray.train.report`; a run started again with the
  same `out_dir` resumes from the latest one, and so do workers that Ray restarts after a failure.

Default: a local Ray instance, started and stopped here; `ray_address` joins a cluster
(`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from nas.cluster import probe
from nas.supernet import ElasticUNet, SkipConfig
from nas.training.checkpoints import load_checkpoint, save_ema
from nas.training.config import (
    CHECKPOINT_DIR,
    EMA_DIR,
    STATE_NAME,
    Parallel,
    TrainConfig,
    TrainResult,
)
from nas.training.robust import Objective, make_ema, train
from search_spaces import Architecture, SearchSpace, UserError
from search_spaces.spec import SpaceSpec

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2  # Ray Train keeps the latest checkpoints of a run, older ones are deleted
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders: checkpoint_<step>


# -- the Ray cluster -----------------------------------------------------------------------------


@contextmanager
def ray_cluster(address: str | None, workers: int, use_gpu: bool | None = None) -> Iterator[bool]:
    """Join the Ray cluster at `address`, or start a local instance (stopped on exit; a Ray
    this process already joined is used as it is, another address refused), and check that it
    can hold `workers` workers. Yields whether they train on GPUs: `use_gpu=None` uses GPUs
    when the cluster has one per worker; True asks for them (a UserError where too few).

    The address is checked as the search's evaluation pool checks it (`nas.cluster.probe`);
    unlike that pool, the workers' output reaches the driver: Ray Train's line for each
    reported checkpoint (its step and loss) is the progress of a run."""
    import ray

    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1 worker")
    started = False
    if ray.is_initialized():
        joined = ray.get_runtime_context().gcs_address
        if address is not None and address != joined:
            raise UserError(
                f"--ray-address {address}: this process is already connected to the Ray "
                f"cluster at {joined}; give that address, leave out --ray-address to train "
                "there, or call ray.shutdown() first"
            )
    elif address is None:
        # a CPU worker takes one logical CPU: more workers than cores still run (oversubscribed)
        cpus = max(os.cpu_count() or 1, workers)
        if workers > (os.cpu_count() or 1):
            log.warning("%d workers on %d CPU cores: they share the cores", workers, cpus)
        ray.init(num_cpus=cpus, include_dashboard=False)
        started = True
    else:
        probe(address)
        try:
            ray.init(address=address)
        except Exception as e:  # ConnectionError, an authentication error, RuntimeError...
            raise UserError(
                f"cannot join the Ray cluster at --ray-address {address}: {e}. If the cluster "
                "uses token authentication, set RAY_AUTH_MODE=token and give its token "
                "(RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            ) from None
        started = True  # disconnect this driver at the end (the cluster keeps running)
    try:
        yield _check_resources(ray.cluster_resources(), workers, use_gpu)
    finally:
        if started:
            ray.shutdown()


def check_train_args(workers: int, ray_address: str | None, use_gpu: bool | None) -> None:
    """The checks that need no cluster, for a command to fail at once on bad flags: the
    number of workers, a reachable address, and GPUs where training runs in this process."""
    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1 worker")
    if ray_address is not None:
        probe(ray_address)  # a malformed or unreachable address fails within seconds
    elif use_gpu and torch.cuda.device_count() < workers:
        # no address: the workers run on this machine (a local Ray instance, or this process)
        raise UserError(
            f"--gpus asks for {workers} GPU(s), one per worker, but this machine has "
            f"{torch.cuda.device_count()}; train on CPUs (--no-gpus), use fewer --workers, or "
            "join a cluster with GPUs (--ray-address)"
        )


def _check_resources(resources: dict[str, float], workers: int, use_gpu: bool | None) -> bool:
    """Fail now rather than wait forever for resources the cluster does not have."""
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if use_gpu is None:
        use_gpu = gpus >= workers
        if 0 < gpus < workers:
            log.warning("%d workers but %g GPUs: training on CPUs", workers, gpus)
    if use_gpu and gpus < workers:
        raise UserError(
            f"GPUs asked for: {workers} worker(s) with one GPU each, but the Ray cluster has "
            f"{gpus:g} GPU(s); use fewer --workers, add GPU nodes, or train on CPUs (--no-gpus)"
        )
    if cpus < workers:
        raise UserError(
            f"{workers} workers need a CPU each, but the Ray cluster has {cpus:g} CPU(s); "
            f"use --workers {int(cpus)} or fewer, or add nodes"
        )
    return use_gpu


# -- training ------------------------------------------------------------------------------------


def train_ray(
    model: ElasticUNet,
    data,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    workers: int,
    resume: bool = False,
    encode: Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
    uncond: torch.Tensor | None = None,
    ray_address: str | None = None,
    use_gpu: bool | None = None,
    max_failures: int = 0,
    objective: Callable[[torch.nn.Module, torch.device], Objective] | None = None,
) -> TrainResult:
    """`nas.training.robust.train(model, data, config, ...)` on `workers` Ray Train workers.

    `data`, `encode` and `uncond` go to the workers through Ray's object store (they must
    pickle); the model goes as its weights and space (an ElasticUNet) or config (a standalone
    or plain diffusers UNet). `out_dir` is the Ray Train run folder (`checkpoint_<step>/`
    folders, and `ema/` with EMA); `resume=True` continues its latest checkpoint.
    `max_failures`: times Ray restarts failed workers from the latest checkpoint. `objective`:
    what a step minimises (default: the denoising loss), made on each worker from its copy of
    the model and its device, by a callable that pickles (`DistillationJob` of
    `nas.training.distillation`).
    When it returns, `model` holds the trained weights (as `train` leaves them).
    """
    config.check()
    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1 worker")
    if config.batch_size % workers:
        raise UserError(
            f"the batch of {config.batch_size} samples cannot be split evenly over {workers} "
            f"workers; give a batch size that is a multiple of {workers}"
        )
    out_dir = Path(out_dir).expanduser().resolve()
    if resume and latest_checkpoint(out_dir) is None:
        raise UserError(
            f"--resume, but {out_dir} holds no Ray Train checkpoint ({CHECKPOINT_PREFIX}*/); "
            "start the run without --resume"
        )
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(
            f"{out_dir} exists and is not empty; resume that run with --resume, or give "
            "another output folder (nothing stored is overwritten)"
        )
    t0 = time.perf_counter()

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with ray_cluster(ray_address, workers, use_gpu) as gpus:
        job = {
            "model": _pack(model),
            "data": data,
            "encode": encode,
            "uncond": uncond,
            "config": config,
            "objective": objective,
        }
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"job": ray.put(job), "threads": 1},
            torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=gpus, resources_per_worker={"CPU": 1}
            ),
            run_config=RunConfig(
                name=out_dir.name,
                storage_path=str(out_dir.parent),
                checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise _user_error_of(e) or e from None

    # the run's outcome is its last checkpoint: the trained weights, losses and EMA
    with result.checkpoint.as_directory() as folder:
        state = load_checkpoint(model, Path(folder), config)
    ema = None
    if config.ema_decay:  # train() refuses to resume an EMA run from a checkpoint without one
        ema = make_ema(model, config.ema_decay)
        ema.load_state_dict(state["ema"])
        save_ema(model, ema, out_dir / EMA_DIR)
    return TrainResult(
        losses=list(state["losses"]),
        steps=state["step"],
        skip_counts={(s, i): n for s, i, n in state["skip_counts"]},
        seconds=time.perf_counter() - t0,
        checkpoint=Path(result.checkpoint.path),
        ema=ema,
        config=config,
        terms={k: list(v) for k, v in state.get("terms", {}).items()},
    )


def check_resume(state_dir: Path, on_ray: bool, owner: Path, start_over: str) -> bool:
    """Whether `state_dir` holds a checkpoint to resume (in-process `checkpoint/`, or Ray
    Train's `checkpoint_<step>/`); a UserError where it holds one of the other way of
    training than `on_ray` says (`owner`: the folder to name, `start_over`: the way out)."""
    here = (state_dir / CHECKPOINT_DIR / STATE_NAME).is_file()
    on_ray_before = latest_checkpoint(state_dir) is not None
    if on_ray and here and not on_ray_before:
        raise UserError(
            f"{owner} was trained in one process; resume it the same way (--workers 1, no "
            f"--ray-address), or {start_over}"
        )
    if not on_ray and on_ray_before and not here:
        raise UserError(
            f"{owner} was trained on Ray Train; resume it with --workers 2 or more, or with "
            f"--ray-address, or {start_over}"
        )
    return here or on_ray_before


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The Ray Train checkpoint of `run_dir` with the most steps, if any."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_NAME).is_file()]
    return max(found, default=None, key=lambda p: p.name)


def _train_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs: `nas.training.robust.train` as one part of the run."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    torch.set_num_threads(loop_config["threads"])
    job = ray.get(loop_config["job"])
    model = _unpack(job["model"])
    device = ray.train.torch.get_device()
    config = replace(job["config"], device=str(device))
    objective = job["objective"](model, device) if job["objective"] is not None else None
    parallel = Parallel(
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        wrap=_ddp,
        checkpoint=_report_checkpoint,
    )
    # the latest checkpoint of this run: a resumed run, or workers restarted after a failure
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as folder:
        train(
            model,
            job["data"],
            config,
            resume=Path(folder) if folder else False,
            encode=job["encode"],
            uncond=job["uncond"],
            progress=False,  # a worker's progress bar cannot redraw through Ray's log lines
            parallel=parallel,
            objective=objective,
        )


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    import ray.train.torch

    # skipped blocks take no part in a step: DDP must look for unused parameters, and leaves
    # their gradients unset (every worker skips the same blocks, so they are unused by all)
    return ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True}
    )


def _report_checkpoint(
    step: int, metrics: dict[str, float], write: Callable[[Path], Path]
) -> Path | None:
    """Every worker reports (ray.train.report is a barrier); rank 0 writes the checkpoint, the
    same on every worker, and Ray Train persists it in the run folder."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = write(Path(tmp) / "checkpoint")
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:08d}",  # sorts by step
        )
    return None


def _user_error_of(error: Exception) -> UserError | None:
    """The UserError a worker raised (bad data, a bad batch size), to report it as one."""
    for failure in getattr(error, "worker_failures", {}).values():
        cause = failure
        while cause is not None:
            if isinstance(cause, UserError):
                return UserError(str(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__
    return None


# -- the model through Ray's object store --------------------------------------------------------


def _pack(model: torch.nn.Module) -> dict:
    """The model as plain data (what save_pretrained writes, in memory): an ElasticUNet itself
    does not pickle, its space holds read-only mappings. A standalone network
    (`SearchedUNet2DConditionModel`) or a plain diffusers UNet goes as its config (and
    architecture) and weights."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not isinstance(model, ElasticUNet):
        multiplicity = getattr(model, "multiplicity", None)
        return {
            "kind": "searched" if multiplicity is not None else "diffusers",
            "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
            "multiplicity": multiplicity,
            "state": state,
        }
    spec = model.space.spec.model_dump(mode="json")
    spec["base"] = {"config": dict(model.space.unet_config)}  # self-contained
    return {
        "kind": "elastic",
        "space": spec,
        "architecture": model.architecture.to_dict(),
        "copies": model.copy_counts(),
        "skip": asdict(model.skip),
        "state": state,
    }


def _unpack(packed: dict) -> torch.nn.Module:
    kind = packed.get("kind", "elastic")
    if kind == "searched":
        from nas.searched_unet import SearchedUNet2DConditionModel

        model = SearchedUNet2DConditionModel.from_architecture(
            packed["config"], packed["multiplicity"]
        )
        model.load_state_dict(packed["state"])
        return model
    if kind == "diffusers":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_config(packed["config"])
        model.load_state_dict(packed["state"])
        return model
    space = SearchSpace(SpaceSpec.model_validate(packed["space"]))
    model = ElasticUNet(space, skip=SkipConfig(**packed["skip"]))
    model.ensure_copies(packed["copies"])
    model.load_state_dict(packed["state"])
    model.set_architecture(Architecture.from_dict(packed["architecture"]))
    return model


__all__ = ["check_resume", "check_train_args", "latest_checkpoint", "ray_cluster", "train_ray"]
