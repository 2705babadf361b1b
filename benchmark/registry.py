"""One registry style for every extension point (losses, evaluation kinds, launchers, dataset
source formats), after timm's `register_model` / `list_models`.

A registry maps a name to an entry that carries everything about that kind of thing (its
config check, its description, where its computation lives). Entries are registered in
torch-free modules, so planning and pre-launch checks can list and check them without loading
torch: an entry names its torch-side function by import path (`"benchmark.losses:trades"`),
resolved with `resolve` only where the computation runs.

Extensions outside the project register their entries from a module named in the root
config's `plugins` list (imported when a study is planned), plus one config file in a config
directory of `RFTBENCH_CONF_PATH`.
"""
from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from benchmark.errors import RFTBenchError, unknown_choice

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, e.g. `LOSSES = Registry("loss kind")`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add `entry` under `name`; registering a name twice is an error (two plugins clash)."""
        if name in self._entries and self._entries[name] != entry:
            raise RFTBenchError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise unknown_choice(self.kind, name, self._entries) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self, pattern: str = "*") -> list[str]:
        """The registered names matching the shell-style `pattern`, sorted."""
        return sorted(fnmatch.filter(self._entries, pattern))


def resolve(path: str) -> Callable[..., Any]:
    """The object at `"package.module:attribute"`, imported now (the lazy half of an entry)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def load_plugins(modules: list[str]) -> None:
    """Import the modules of the config's `plugins` list: importing one registers its entries."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise RFTBenchError(f"plugin module {module!r} (config key `plugins`) cannot be imported: {err}") from None
