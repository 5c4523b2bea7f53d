"""Registries of named things users add to (tools, tasks): one mechanism for all of them."""

from __future__ import annotations

from typing import Any, Callable, Optional


class Registry:
    """Callables under string names, e.g. `Registry("tool", "callable as fn(arguments) -> str")`.

    `expects` says what an entry must be, for the error message when it is not callable.
    """

    def __init__(self, kind: str, expects: str):
        self.kind = kind
        self.expects = expects
        self.entries: dict[str, Any] = {}

    def add(self, name: str, entry, *, replace: bool = False,
            transform: Optional[Callable] = None):
        """Register `entry` (stored as `transform(entry)` when given); returns `entry`."""
        if not callable(entry):
            raise TypeError(f"{self.kind} {name!r} must be {self.expects}, "
                            f"got {type(entry).__name__}")
        if name in self.entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered "
                             f"(pass replace=True to override)")
        self.entries[name] = entry if transform is None else transform(entry)
        return entry

    def get(self, name: str):
        try:
            return self.entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                             f"{known}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self.entries)
