"""Profiling backends: one small interface (`base.Backend`), and a registry of them.

A backend turns a `BlockSignature` into something runnable on its device (`convert_model`),
times it (`profile`), and says whether it can run here at all (`test_connection`).
The backends register themselves when their module is imported; importing them loads their
runtimes (torch, coremltools, ExecuTorch), so that happens only when one is asked for.
"""

from __future__ import annotations

from search_spaces import UserError

from .base import BACKENDS, Backend, Timing, register

__all__ = [
    "BACKENDS",
    "Backend",
    "Timing",
    "backend_class",
    "get_backend",
    "register",
    "setting_backend",
]


def backend_class(name: str) -> type[Backend]:
    """The registered backend called `name`."""
    from . import coreml, executorch_backend, torch_backend  # noqa: F401  (registers them)

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def get_backend(name: str, adb: str | None = None, runner=None, **kwargs) -> Backend:
    """Backend `name` with its settings (compute unit: the backend's first by default).

    `adb`: an Android phone's serial; the backend builds its programs here and `runner`
    (ExecuTorch's executor_runner built for the phone) times them there (backends/android.py).
    """
    cls = backend_class(name)
    if kwargs.get("compute_unit") is None:
        kwargs["compute_unit"] = cls.compute_units[0]
    if adb is not None:
        from .android import android_backend

        return android_backend(name, adb, runner, **kwargs)
    return cls(**kwargs)


def setting_backend(setting: dict, **kwargs) -> Backend:
    """The backend of a table setting (a dict with backend, compute_unit and precision, as a
    device or `LatencyTable.setting` has it), with timing `kwargs` as `get_backend` takes."""
    return get_backend(
        setting["backend"],
        compute_unit=setting["compute_unit"],
        precision=setting["precision"],
        **kwargs,
    )
