"""Finding search spaces: built-in names, YAML paths, and plug-ins.

A plug-in is a Python entry point in group `diffnas.search_spaces`; the object it names is a
`SearchSpace`, a callable returning one, or the path of a YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path

from .errors import SpaceError
from .space import SearchSpace

ENTRY_POINT_GROUP = "diffnas.search_spaces"


@dataclass(frozen=True)
class SpaceEntry:
    name: str
    origin: str  # "built-in" or "plug-in <distribution>"
    description: str


def _builtin_files() -> dict[str, Path]:
    folder = resources.files("search_spaces") / "builtin"
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def _plugins() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


@lru_cache(maxsize=16)
def _builtin(name: str) -> SearchSpace:
    space = SearchSpace.from_yaml(_builtin_files()[name])
    space.ref = name
    return space


def _from_plugin(ep: metadata.EntryPoint) -> SearchSpace:
    try:
        obj = ep.load()
    except Exception as e:  # a broken plug-in must not look like a diffnas bug
        raise SpaceError(f"plug-in space {ep.name!r} ({ep.value}) failed to import: {e}") from e
    if callable(obj) and not isinstance(obj, SearchSpace):
        obj = obj()
    if isinstance(obj, str | Path):
        obj = SearchSpace.from_yaml(obj)
    if not isinstance(obj, SearchSpace):
        raise SpaceError(
            f"plug-in space {ep.name!r} ({ep.value}) gave a {type(obj).__name__}; it must give a "
            "SearchSpace, a function returning one, or the path of a space YAML file"
        )
    obj.ref = ep.name
    return obj


def load_space(ref: str | Path) -> SearchSpace:
    """A space by YAML path, built-in name or plug-in name (in that order)."""
    ref_str = str(ref)
    # a path only when it looks like one: a file named "tiny" must not shadow the built-in
    if ref_str.endswith((".yaml", ".yml")) or ("/" in ref_str and Path(ref_str).is_file()):
        return SearchSpace.from_yaml(ref_str)
    if ref_str in _builtin_files():
        return _builtin(ref_str)
    plugins = _plugins()
    if ref_str in plugins:
        return _from_plugin(plugins[ref_str])
    known = sorted(set(_builtin_files()) | set(plugins))
    raise SpaceError(
        f"unknown search space {ref_str!r}: give a YAML file or one of {', '.join(known)}"
    )


def list_spaces() -> list[SpaceEntry]:
    import yaml

    out = []
    for name, path in sorted(_builtin_files().items()):
        description = yaml.safe_load(path.read_text()).get("description", "")
        out.append(SpaceEntry(name, "built-in", description))
    for name, ep in sorted(_plugins().items()):
        dist = ep.dist.name if ep.dist else "?"
        out.append(SpaceEntry(name, f"plug-in ({dist})", ep.value))
    return out
