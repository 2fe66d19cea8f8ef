"""The search-space file format (YAML), parsed with line numbers and validated with pydantic.

Every error names the file, the line and the field, and says what is allowed.
The meaning of each field is documented in docs/dsl.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import SpaceError

Kind = Literal["resnet", "cross_attention"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSpec(_Strict):
    """Where the base UNet comes from: exactly one of the three."""

    builtin: str | None = None  # a built-in UNet config: sd15, sd21, tiny
    # a diffusers UNet2DConditionModel config: inline, or the path of its JSON file
    config: dict[str, Any] | str | None = None
    pretrained: str | None = None  # a local diffusers pipeline folder holding unet/config.json

    @field_validator("config", mode="before")
    @classmethod
    def _mapping_or_path(cls, value):
        # one message for both forms, instead of one per member of the union
        if value is not None and not isinstance(value, dict | str):
            raise ValueError(
                "give the UNet config as a mapping, or the path of its JSON file "
                "(e.g. config: my_unet.json)"
            )
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("builtin", "config", "pretrained") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of builtin, config, pretrained"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class InputsSpec(_Strict):
    latent: tuple[int, int, int]  # latent channels, height, width
    context: tuple[int, int]  # text context tokens, width
    batch: int = Field(2, ge=1)  # 2 = one classifier-free-guidance pair

    @model_validator(mode="after")
    def _positive(self):
        if min(self.latent + self.context) < 1:
            raise ValueError("latent and context sizes must be positive")
        return self


class RuleSpec(_Strict):
    """Applies to the slots whose path matches `match` (and `kind`, if given); later rules win."""

    match: str  # glob over slot paths, e.g. "up_blocks.*.attentions.*"
    kind: Kind | None = None  # only slots of this kind
    removable: bool | None = None  # the search may remove the block
    max_copies: int | None = Field(None, ge=0)  # the search may add up to this many copies
    on_illegal: Literal["error", "skip"] = "error"  # a matched slot whose shapes forbid the rule


class ConstraintSpec(_Strict):
    """Bounds the number of blocks (multiplicities summed) of one kind in matching stages."""

    stage: str = "*"  # stage name or glob
    kind: Kind | None = None  # count only this kind (both kinds if absent)
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min is None and self.max is None:
            raise ValueError("a constraint needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class SpaceSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used in files and tables
    description: str = ""
    base: BaseSpec
    inputs: InputsSpec
    stages: dict[str, list[str]] | None = None  # stage name -> globs; default: one per UNet block
    rules: list[RuleSpec] = []
    constraints: list[ConstraintSpec] = []
    max_params: int | None = Field(None, gt=0)  # parameter budget of any architecture

    _source: str = PrivateAttr("<string>")  # file the spec was read from
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)  # field path -> line

    def where(self, *loc) -> str:
        """`file:line` of a field, for error messages about its meaning (not its syntax)."""
        line = next(
            (self._lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in self._lines), None
        )
        return f"{self._source}:{line}" if line else self._source


def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each field path (as pydantic's `loc`) to its 1-based line in the file."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)  # a key's own line wins over its value's
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[path + (k,)] = key.start_mark.line + 1
            _line_index(value, path + (k,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, path + (i,), out)
    return out


def parse_spec(text: str, source: str = "<string>") -> SpaceSpec:
    """Parse and validate a space file; one SpaceError naming source:line on any problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise SpaceError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: a search space file must be a YAML mapping (name, base, ...)")
    lines = _line_index(node)
    try:
        spec = SpaceSpec.model_validate(data)
    except ValidationError as e:
        messages = []
        for err in e.errors():
            loc = tuple(err["loc"])
            # pydantic appends the union/literal member to loc; find the deepest known line
            line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), 1)
            field = ".".join(str(p) for p in loc) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(loc[:-1])
                msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
            messages.append(f"{source}:{line}: {field}: {msg}")
        raise SpaceError("\n".join(messages)) from None
    spec._source, spec._lines = source, lines
    return spec


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = SpaceSpec
    for part in loc:
        if isinstance(part, int):
            continue
        ann = model.model_fields[part].annotation
        sub = getattr(ann, "__args__", (ann,))
        nested = [a for a in sub if isinstance(a, type) and issubclass(a, BaseModel)]
        nested += [
            b
            for a in sub
            for b in getattr(a, "__args__", ())
            if isinstance(b, type) and issubclass(b, BaseModel)
        ]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


def read_spec(path: str | Path) -> SpaceSpec:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file {str(path)!r} does not exist")
    return parse_spec(path.read_text(), source=str(path))
