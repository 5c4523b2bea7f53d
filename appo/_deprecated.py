"""Old names kept for one release: a module's `__getattr__` that answers them with a warning."""

from __future__ import annotations

import warnings
from typing import Any, Callable


def renamed(module: str, names: dict[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """`__getattr__` for `module`: old name -> (new name, object), with a DeprecationWarning."""
    def __getattr__(name: str):
        if name in names:
            new, value = names[name]
            warnings.warn(f"{module}.{name} is deprecated: use {new}", DeprecationWarning,
                          stacklevel=2)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
