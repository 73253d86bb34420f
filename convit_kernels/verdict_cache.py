"""The on-device verdicts kept between processes: one JSON file per device name in the user's cache folder."""

from __future__ import annotations

import json
import os
import re

__all__ = ["cache_path", "read_verdicts", "store_verdicts"]


def cache_path(device_name: str) -> str:
    """$XDG_CACHE_HOME (or ~/.cache)/convit_kernels/self-check/<device name>.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name)
    return os.path.join(root, "convit_kernels", "self-check", safe + ".json")


def read_verdicts(path: str, stack: dict) -> dict[str, dict]:
    """The verdicts stored at ``path`` for this software ``stack`` (others are ignored), by combination key."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return {}
    return content.get("verdicts", {}) if content.get("stack") == stack else {}


def store_verdicts(path: str, stack: dict, entries: dict[str, dict]) -> str:
    """Merge ``entries`` into the file at ``path`` (written atomically); returns the path."""
    stored = read_verdicts(path, stack)
    stored.update(entries)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump({"stack": stack, "verdicts": stored}, f, indent=1, sort_keys=True)
    os.replace(partial, path)
    return path
