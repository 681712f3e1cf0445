"""Names of a package loaded on first use (PEP 562), so importing the package stays cheap."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, modules: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], object]:
    """A module ``__getattr__``: ``name`` is imported from ``modules[name]`` on first use and
    bound in ``namespace`` (the package's ``globals()``), so later lookups are plain reads."""

    def __getattr__(name: str) -> object:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(modules[name]), name)
        namespace[name] = value
        return value

    return __getattr__
