"""Checks that a module of the installed Flower is the exact one this project adjusts.

Two of Flower 1.41.0's polling waits are adjusted here by replacing a module global with the
same function under shorter backoffs (``client.supernode_polling`` in the site's SuperNode,
``server.reply_polling`` in the coordinator's ServerApp). Such a replacement is sound only
for the code it was written against, so it is made only when ``flwr`` is version 1.41.0 and
the module's source file has the SHA-256 recorded here; on any other Flower the callers
refuse (the SuperNode launcher) or leave Flower as it is (the ServerApp).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

PINNED_FLWR_VERSION = "1.41.0"


class UnpinnedFlowerError(RuntimeError):
    """The installed Flower is not the one an adjustment was written against."""


def check_pinned_source(module_name: str, version: str, source: bytes, sha256: str) -> None:
    """Raise :class:`UnpinnedFlowerError` unless ``version`` is the pinned Flower and
    ``source`` hashes to ``sha256``."""
    digest = hashlib.sha256(source).hexdigest()
    if version != PINNED_FLWR_VERSION or digest != sha256:
        raise UnpinnedFlowerError(
            f"written against flwr {PINNED_FLWR_VERSION} ({module_name}, SHA-256 "
            f"{sha256[:12]}...), found flwr {version} with SHA-256 {digest[:12]}..."
        )


def _source_path(module_name: str) -> Path | None:
    """The module's file, found without importing the module."""
    top, _, rest = module_name.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent.joinpath(*rest.split(".")).with_suffix(".py")


def is_pinned(module_name: str, sha256: str) -> bool:
    """Whether the installed module is the pinned one; imports nothing (cheap)."""
    path = _source_path(module_name)
    try:
        version = importlib.metadata.version("flwr")
        check_pinned_source(module_name, version, path.read_bytes() if path else b"", sha256)
    except (OSError, importlib.metadata.PackageNotFoundError, UnpinnedFlowerError):
        return False
    return True


def load_pinned_module(module_name: str, sha256: str) -> ModuleType:
    """The module, imported, after checking that it is the pinned one."""
    module = importlib.import_module(module_name)
    check_pinned_source(
        module_name,
        importlib.metadata.version("flwr"),
        Path(str(module.__file__)).read_bytes(),
        sha256,
    )
    return module
