"""Shared fixtures for the search-space tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[..., Path]:
    """Write a (dedented) YAML text under tmp_path and return its path."""

    def write(text: str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


def line_of(path: Path, needle: str) -> int:
    """1-based number of the first line of `path` that contains `needle`."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} is not in {path}")


@pytest.fixture
def find_line() -> Callable[[Path, str], int]:
    return line_of
