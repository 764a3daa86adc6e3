"""``hasten tune``: find the fastest accelerator stack that keeps a stated quality, and presets to apply it.

* :func:`tune` searches the registry :data:`SPACE` (timestep schedule, step cache, guidance, quantization,
  and the families that are off by default) against the baseline and returns a :class:`TuneResult`.
* :func:`apply` switches a saved preset (JSON) on for a pipeline; the ComfyUI node "Apply hasten preset"
  does the same to a MODEL.
"""

from __future__ import annotations

from .preset import PresetError, apply, load_preset, save_preset, validate_preset
from .schedule import ScheduleConfig, disable_timestep_schedule, enable_timestep_schedule, flow_sigmas
from .search import Objective, Trial, TuneResult, tune
from .space import SPACE, Context, Entry, register

__all__ = [
    "SPACE", "Context", "Entry", "Objective", "PresetError", "ScheduleConfig", "Trial", "TuneResult", "apply",
    "disable_timestep_schedule", "enable_timestep_schedule", "flow_sigmas", "load_preset", "register",
    "save_preset", "tune", "validate_preset",
]


class _CallableModule(__import__("types").ModuleType):
    """``hasten.tune`` is both this package and the :func:`tune` function: importing a submodule makes Python
    set ``hasten.tune`` to the package, so the package itself is callable and forwards to :func:`tune`."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return tune(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
