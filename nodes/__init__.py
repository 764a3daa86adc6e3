"""ComfyUI nodes (loaded by ComfyUI through the pack's root __init__)."""

from .easycache import NODE_CLASS_MAPPINGS as _EASYCACHE_NODES
from .easycache import NODE_DISPLAY_NAME_MAPPINGS as _EASYCACHE_NAMES

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

NODE_CLASS_MAPPINGS.update(_EASYCACHE_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_EASYCACHE_NAMES)
