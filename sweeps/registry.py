"""Registries of models and datasets: a spec names an entry, it never carries code.

Built-in entries live in :mod:`sweeps.models` and :mod:`sweeps.data`. A lab adds its own by
installing a package that declares a Python entry point in the group ``l0sweep.models`` or
``l0sweep.datasets``; loading the entry point imports the package, whose ``@register_model`` /
``@register_dataset`` decorators add the entries (the pattern of timm's ``@register_model``).
A plugin that fails to import stops the process that loads the registry (:class:`PluginLoadError`,
naming the entry point and its exception) rather than leaving a spec to say "unknown model".
A dataset's factory (and its params' ``check_data``) may take a keyword ``dirs``
(`sweeps.config.DataDirs`): the data directories of the process, passed in, never read from the
environment behind the caller's back. Each entry carries a Pydantic model of its parameters, so a spec's ``params`` are validated with
field paths and published as JSON Schema (``GET /models``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = [
    "DATASETS",
    "MODELS",
    "Entry",
    "NoParams",
    "PluginLoadError",
    "Registry",
    "UnknownNameError",
    "list_datasets",
    "list_models",
    "load_builtins",
    "register_dataset",
    "register_model",
    "takes_dirs",
]


class NoParams(BaseModel):
    """Parameters of an entry that takes none."""

    model_config = ConfigDict(extra="forbid")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class PluginLoadError(RuntimeError):
    """An installed plugin (a Python entry point of ``l0sweep.models`` or ``l0sweep.datasets``)
    failed to import: the lab's set-up is broken, not the spec that names its entry."""

    def __init__(self, kind: str, group: str, name: str, value: str, exc: BaseException) -> None:
        self.entry_point = name
        super().__init__(
            f"the {kind} plugin {name!r} (entry point {value!r} in group {group!r}) failed to "
            f"import: {type(exc).__name__}: {exc}; fix or uninstall the package that declares it"
        )


@dataclass(frozen=True)
class Entry:
    """One registered factory, with the Pydantic model of its parameters."""

    name: str
    factory: Callable[..., Any]
    params: type[BaseModel]
    description: str

    def describe(self) -> dict[str, Any]:
        """``{name, description, params}``, params as JSON Schema (for GET /models)."""
        return {
            "name": self.name,
            "description": self.description,
            "params": self.params.model_json_schema(),
        }


class Registry:
    """Name -> factory, filled by decorators and by installed entry points."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry] = {}

    def register(
        self, name: str, params: type[BaseModel] = NoParams, description: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers ``factory`` under ``name``.

        Raises:
            ValueError: the name is already taken by a different factory.
        """

        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            old = self._entries.get(name)
            if old is not None and old.factory is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered by {old.factory}")
            doc = (factory.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(
                name, factory, params, description or (doc[0] if doc else "")
            )
            return factory

        return decorator

    def get(self, name: str) -> Entry:
        """The entry called ``name``.

        Raises:
            UnknownNameError: with the registered names in the message.
        """
        load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        load_builtins()
        return [self._entries[n] for n in sorted(self._entries)]

    def _load_entry_points(self) -> None:
        """Import every installed plugin of this registry.

        Raises:
            PluginLoadError: a plugin failed to import.
        """
        for ep in entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:
                raise PluginLoadError(self.kind, self.group, ep.name, ep.value, exc) from exc


MODELS = Registry("model", "l0sweep.models")
DATASETS = Registry("dataset", "l0sweep.datasets")
register_model = MODELS.register
register_dataset = DATASETS.register

_loaded = False


def load_builtins() -> None:
    """Import the built-in entries and the installed entry points (once per process).

    Raises:
        PluginLoadError: an installed plugin failed to import (raised again on every call).
    """
    global _loaded
    if _loaded:
        return
    _loaded = True  # before the imports: a module they import may read the registry
    try:
        import_module("sweeps.models")
        import_module("sweeps.data")
        MODELS._load_entry_points()
        DATASETS._load_entry_points()
    except BaseException:
        _loaded = False
        raise


def list_models() -> list[dict[str, Any]]:
    """Every registered model as ``{name, description, params}`` (params: JSON Schema)."""
    return [e.describe() for e in MODELS.entries()]


def list_datasets() -> list[dict[str, Any]]:
    """Every registered dataset as ``{name, description, params}`` (params: JSON Schema)."""
    return [e.describe() for e in DATASETS.entries()]


def takes_dirs(function: Any, dirs: Any) -> dict[str, Any]:
    """``{"dirs": dirs}`` if ``function`` (a dataset factory, a params' ``check_data``) takes the
    data directories, else ``{}``: a plugin's dataset that reads no files need not."""
    if dirs is None:
        return {}
    try:
        return {"dirs": dirs} if "dirs" in inspect.signature(function).parameters else {}
    except (TypeError, ValueError):  # no signature to read (a builtin): it takes none
        return {}
