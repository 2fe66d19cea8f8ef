"""The block slots read off a UNet config, kept on disk between runs.

Reading the slots needs torch and diffusers (a meta forward of the UNet), and importing those
takes seconds, more than ten on a busy machine: longer than everything else `diffnas space
show` or `space validate` does. The slots depend only on the config, the input shapes and the
code that reads them, so they are stored under `$DIFFNAS_CACHE/space-blocks/` keyed by a hash
of exactly those (diffusers' version and `unet.py` included); anything else is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from .unet import BlockInfo

log = logging.getLogger(__name__)

_READER = Path(__file__).with_name("unet.py")  # the code that reads the slots


def _folder() -> Path:
    # the same folder as latency's model cache (latency.coreml.cache_dir)
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffnas"
    return Path(os.environ.get("DIFFNAS_CACHE", default)) / "space-blocks"


def blocks_key(config: dict[str, Any], latent, context, batch: int) -> str:
    try:
        diffusers = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        diffusers = "?"
    what = {
        "config": config,
        "latent": list(latent),
        "context": list(context),
        "batch": batch,
        "diffusers": diffusers,
        "reader": hashlib.sha256(_READER.read_bytes()).hexdigest(),
    }
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_blocks(key: str) -> tuple[list[BlockInfo], int] | None:
    """The blocks and parameter count stored under `key`, or None."""
    path = _folder() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        return [BlockInfo(**b) for b in data["blocks"]], int(data["params"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:  # damaged: read the UNet again
        log.debug("ignoring the slot cache %s: %s", path, e)
        return None


def store_blocks(key: str, blocks: list[BlockInfo], params: int) -> None:
    """Keep them for the next run; a cache that cannot be written only costs time."""
    folder = _folder()
    text = json.dumps({"blocks": [asdict(b) for b in blocks], "params": params})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{key}.{os.getpid()}.tmp"
        partial.write_text(text)
        partial.replace(folder / f"{key}.json")  # atomic: readers see all or nothing
    except OSError as e:
        log.debug("cannot write the slot cache in %s: %s", folder, e)
