"""The experiment file of `diffnas search` (YAML), validated with pydantic.

Every field is documented in docs/experiment.md. Errors name the file, line and field,
as for search-space files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nas.distill_config import DistillConfig
from nas.protocol_checks import check_steps, check_timesteps
from search_spaces import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorldSpec(_Strict):
    kind: Literal["tiny", "stable_diffusion"] = "tiny"  # where data, CLIP and weights come from
    miniature: bool = False  # tiny only: a few-step world, for tests
    # tiny only: JSON file of TinyWorldConfig fields (as `diffnas world build --world-config`)
    world_config: str | None = None
    # -- stable_diffusion (nas/worlds/sd.py): local files, nothing is downloaded --
    data_dir: str = "."  # folder the relative paths below are read from (relative to the cwd)
    pipeline: str | None = None  # local diffusers pipeline folder (unet/, vae/, text_encoder/...)
    captions: str | None = None  # MS-COCO captions_val2014.json: the validation prompts
    clip_model: str = "ViT-g-14"  # open_clip model name
    clip_weights: str | None = None  # local open_clip weights file of clip_model
    resolution: int = Field(512, ge=8)  # image side in pixels; latent side = resolution / 8
    train_images: str | None = None  # folder of robust-training images (e.g. COCO train2014/)
    train_captions: str | None = None  # their captions, MS-COCO format (captions_train2014.json)
    device: str = "cpu"  # torch device of the UNet, VAE, text encoder and CLIP ("cuda", ...)

    @model_validator(mode="after")
    def _files_of_its_kind(self):
        sd_keys = ["pipeline", "captions", "clip_weights", "train_images", "train_captions"]
        if self.kind == "tiny":
            given = [k for k in sd_keys if getattr(self, k) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: only for kind stable_diffusion (this world is tiny)"
                )
            if self.miniature and self.world_config:
                raise ValueError("give miniature or world_config, not both: each names the world")
        else:
            needed = [k for k in ("pipeline", "captions", "clip_weights") if not getattr(self, k)]
            if needed:
                raise ValueError(f"kind stable_diffusion needs {', '.join(needed)}")
            if self.miniature or self.world_config:
                raise ValueError("miniature and world_config: only for kind tiny")
            if (self.train_images is None) != (self.train_captions is None):
                raise ValueError("give train_images and train_captions together, or neither")
        return self


class LatencySpec(_Strict):
    device: str = "cpu-local"  # device name in the table
    db: str | None = None  # table file; default: <DIFFNAS_CACHE>/latency.db
    backend: str = "torch"  # backend used when `build` measures missing blocks
    compute_unit: str | None = None  # backend's compute unit (default: its first)
    precision: str = "fp32"
    build: bool = True  # measure what the table lacks first (backends that time here only)
    repeats: int = Field(10, ge=1)  # timed runs per block when building


class TargetSpec(_Strict):
    ms: float | None = Field(None, gt=0)  # latency target in ms on the device
    ratio: float | None = Field(None, gt=0, le=1)  # or: fraction of the original's latency

    @model_validator(mode="after")
    def _one(self):
        if (self.ms is None) == (self.ratio is None):
            raise ValueError("give exactly one of ms, ratio")
        return self


class SearchSpec(_Strict):
    max_iterations: int = Field(10, ge=1)  # evolution iterations at most
    train_steps: int = Field(50, ge=0)  # robust-training steps before each evaluation
    batch_size: int = Field(32, ge=1)  # training batch
    lr: float = Field(1e-4, gt=0)  # training learning rate
    group_size: int = Field(1, ge=1)  # blocks removed (or copied) per iteration
    copy_blocks: bool = True  # once the target is met, copy the most valuable blocks


class EvaluationSpec(_Strict):
    """How each action is scored, and what that costs (docs/evaluation-cost.md)."""

    prompts: int = Field(16, ge=1)  # validation prompts scored per architecture
    seeds: int = Field(1, ge=1)  # initial noises per prompt
    steps: int = Field(10, ge=1)  # sampler steps
    # ddim, or dpm_solver (diffusers' DPMSolverMultistepScheduler, DPM-Solver++ 2M): the same
    # noises and one UNet call per step, good images in fewer steps; at least 2 steps
    sampler: Literal["ddim", "dpm_solver"] = "ddim"
    cfg: float = Field(3.0, ge=1)  # classifier-free guidance scale
    batch_size: int = Field(32, ge=1)  # images generated at once
    # what an architecture is scored with (nas/search/evaluate.py): sample_clip, CLIP of sampled
    # images (steps calls per image); x0_clip, CLIP of one-call x0 predictions from the
    # current network's samples noised to `timesteps` (one call per timestep); x0_distance,
    # the distance of those predictions to the current network's (no decoding, no CLIP)
    metric: Literal["sample_clip", "x0_clip", "x0_distance"] = "sample_clip"
    # the x0 metrics' timesteps, in the training schedule (0..999); default [250, 500, 750]
    timesteps: list[int] | None = None
    # > 0: racing (nas/search/racing.py): every action scored on this many images first, more images
    # only for the actions near the removal cut; 0: every action on every image
    racing: int = Field(0, ge=0)
    # fp32, or fp16 / bf16 autocast for sampling, decoding and CLIP: fp16 is for GPUs (3.7x
    # faster than fp32 for SD-v1.5 on an H100); bf16 also runs on CPUs
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _protocol(self):
        try:
            check_steps(self.sampler, self.steps)
            if self.timesteps is not None:
                if self.metric == "sample_clip":
                    raise UserError(
                        "timesteps are for metric x0_clip or x0_distance (sample_clip samples "
                        "with `steps` steps)"
                    )
                check_timesteps(self.timesteps)
        except UserError as e:
            raise ValueError(str(e)) from None
        images = self.prompts * self.seeds
        if self.racing > images:
            raise ValueError(
                f"racing={self.racing}: more than the {images} images an action is scored on "
                f"(prompts {self.prompts} x seeds {self.seeds}); racing's first round takes "
                "at most all of them: lower racing, or 0 to score every action on every image"
            )
        return self

    def defaults_left_out(self) -> dict:
        """The fields as in the experiment's hash: options added later are left out at the
        value that does what the experiment did before they existed."""
        added = {"sampler": "ddim", "metric": "sample_clip", "timesteps": None}
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if not (k in added and v == added[k])}


class RaySpec(_Strict):
    """Where actions are evaluated (docs/distributed.md). Not part of the experiment's
    identity: a run may be resumed with other workers or on another cluster."""

    workers: int = Field(1, ge=1)  # evaluator actors; 1 without an address: in process, no Ray
    address: str | None = None  # join this Ray cluster (host:port); default: a local instance
    gpus: bool | None = None  # one GPU per actor; None: when the cluster has GPUs
    num_cpus: int | None = Field(None, ge=1)  # local instance's CPUs; default: this machine's
    max_restarts: int = Field(3, ge=0)  # restarts of an actor that dies (its action is re-run)

    @property
    def enabled(self) -> bool:
        """Whether evaluation runs on Ray (several workers, or a cluster to join)."""
        return self.workers > 1 or self.address is not None


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # default run name
    space: str  # search space: built-in name, plug-in name or YAML path
    world: WorldSpec = WorldSpec()
    latency: LatencySpec = LatencySpec()
    target: TargetSpec
    search: SearchSpec = SearchSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    ray: RaySpec = RaySpec()  # how evaluation is spread out (not what is searched)
    seed: int = 0  # seeds training, evaluation noises and everything else
    # `diffnas distill RUN_DIR` after the search (nas/distill_config.py); not in the hash
    distill: DistillConfig = DistillConfig()

    def content_hash(self) -> str:
        """Identifies the experiment (a resume must continue the same one); `ray` says only
        where actions are evaluated, and `distill` what happens after the search, so both
        are left out."""
        exclude = {"ray", "distill"}
        data = self.model_dump(mode="json", exclude=exclude)
        data["evaluation"] = self.evaluation.defaults_left_out()  # old runs keep their hash
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_experiment(path: str | Path, **overrides) -> Experiment:
    """Read an experiment YAML; `overrides` (dotted keys, e.g. {"target.ms": 80}) win."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: an experiment file is a YAML mapping (name, space, target...)")
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if parents == ["target"]:  # --target-ms replaces a ratio in the file, and vice versa
            node.clear()
        node[leaf] = value
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}: {'.'.join(map(str, err['loc']))}: {_message(err)}" for err in e.errors()]
        raise UserError("\n".join(lines)) from None


def _message(err: dict) -> str:
    """A validation error's message; an unknown key lists the keys its section knows."""
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] | None = Experiment
        for key in err["loc"][:-1]:
            field = model.model_fields.get(key) if model else None
            annotation = field.annotation if field else None
            model = (
                annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                else None
            )
        if model is not None:
            return f"unknown option; the options here are: {', '.join(model.model_fields)}"
        return "unknown option"
    return err["msg"].removeprefix("Value error, ")


def absolute_paths(exp: Experiment) -> Experiment:
    """The experiment with its file paths made absolute: Ray Tune runs a trial in a working
    directory of its own (and a cluster node elsewhere), where relative paths mean nothing."""
    space, world, latency = exp.space, exp.world, exp.latency
    if Path(space).is_file():  # a space YAML (built-in and plug-in names stay names)
        space = str(Path(space).resolve())
    # the world's relative files are read from data_dir: anchoring it anchors them all
    world = world.model_copy(update={"data_dir": str(Path(world.data_dir).expanduser().resolve())})
    if latency.db:
        latency = latency.model_copy(update={"db": str(Path(latency.db).resolve())})
    return exp.model_copy(update={"space": space, "world": world, "latency": latency})
