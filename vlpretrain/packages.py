"""Packages imported only where they are used, with an error that says what to install.

A bare CUDA image often has torch and transformers but not PyAV (video decoding) or torchdata
(the resumable data loader). Importing them at module level would stop every command,
`--help` included, on such a machine; importing them here makes only the work that needs
them fail, with the package to add.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vlpretrain.errors import RefusedError


class MissingPackageError(RefusedError, ImportError):
    """A package this work needs is not installed. Not a record's fault: never a skip."""


def require(module: str, needed_for: str, pip_name: str) -> ModuleType:
    """Import `module`, or raise MissingPackageError naming what needs it and how to add it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(
            f"{needed_for} needs the {pip_name!r} package, which is not installed: "
            f"pip install {pip_name} (on a machine without network, `make gpu-wheels` on one "
            "with network downloads the wheels to carry over)"
        ) from err
