"""One registry per pluggable kind (loss, miner, optimizer, scheduler, selection metric, detector): name -> entry.

An entry holds everything about one choice: its name, the function that builds it, the check of the config fields
it uses, a one-line doc for --help, and kind-specific facts (a loss's family, an optimizer that averages its own
weights). Each registry lives beside the code that builds its kind (losses.py, optim.py, selection.py); config.py
reads them to validate a TrainConfig and to list the choices, so a new entry needs no edit anywhere else.

    LOSSES = Registry("loss")

    @LOSSES.register("triplet", family="pair", doc="TripletMarginLoss")
    def _triplet(cfg, embedding_dim, num_classes): ...

    LOSSES.get("triplet").build(...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, TypeVar

from .errors import InputError

if TYPE_CHECKING:
    from .config import TrainConfig

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One registered choice."""

    name: str
    build: Callable[..., Any]
    """Builds the thing (a loss, an optimizer, ...) or, for a selection metric, reads it from a metrics dict."""
    doc: str = ""
    """One line for --help."""
    check: Optional[Callable[[TrainConfig], None]] = None
    """Validates the config fields this entry uses, given the whole TrainConfig; raises InputError (one line)."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """Kind-specific facts, e.g. {"family": "pair"} for a loss."""


class Registry:
    """Name -> Entry for one kind, in registration order (the order --help and error messages list them in)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, build: Optional[F] = None, *, doc: str = "",
                 check: Optional[Callable[[TrainConfig], None]] = None, **info: Any) -> Any:
        """Add an entry: ``register(name, fn, ...)``, or ``@register(name, ...)`` over the build function.

        ``doc`` defaults to the first line of the build function's docstring; a name registered twice is a bug.
        """
        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            line = doc or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, fn, line, check, MappingProxyType(dict(info)))
            return fn

        return add if build is None else add(build)

    def get(self, name: str) -> Entry:
        """The entry called ``name``; an unknown name is an InputError listing the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable value from a YAML file
            raise InputError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}") from None

    def names(self, **info: Any) -> tuple[str, ...]:
        """Registered names, optionally only those whose info matches, e.g. ``LOSSES.names(family="pair")``."""
        return tuple(e.name for e in self if all(e.info.get(k) == v for k, v in info.items()))

    def describe(self) -> str:
        """'name: doc; name: doc' for --help."""
        return "; ".join(f"{e.name}: {e.doc.rstrip('.')}" if e.doc else e.name for e in self)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
