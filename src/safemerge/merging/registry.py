"""The one registry of everything that can be run by name: data-free merge methods ("merge"), merging methods
that need heads and inputs ("data_driven") and post-hoc defenses ("defense").

Each entry has a pydantic options model (`extra="forbid"`, Literal types for choices), so options are checked
(and defaults filled) before any file is opened or any model is loaded:

    from safemerge.merging import registry
    entry = registry.get("ties")                         # one-line SafeMergeError if unknown
    opts = registry.validate("ties", {"density": 0.3})   # an Options instance, or a one-line error
    registry.entries(kind="merge")                       # every data-free method, in registration order

Providers register themselves when imported (`merging.methods`, `merging.pool`, `safety.defenses`); `get`,
`validate` and `entries` import them first, so a lookup sees every method wherever it is defined:

    @registry.register("awm", "defense", AwmOptions)
    def awm(...): ...
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import SafeMergeError

Kind = Literal["merge", "data_driven", "defense"]
KIND_WORDS = {"merge": "merge method", "data_driven": "merge method", "defense": "defense"}
PROVIDERS = {"merge": "safemerge.merging.methods", "data_driven": "safemerge.merging.pool",
             "defense": "safemerge.safety.defenses"}
F = TypeVar("F", bound=Callable[..., Any])


class Options(BaseModel):
    """Base of every options model: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Kind
    options: type[Options]
    fn: Any  # the callable (data-driven methods, defenses) or the merge spec (merge methods)
    doc: str = ""

    def defaults(self) -> dict[str, Any]:
        """Each option with its default ('required' when it has none)."""
        return {k: (f.default if not f.is_required() else "required") for k, f in self.options.model_fields.items()}


_ENTRIES: dict[str, Entry] = {}


def add(name: str, kind: Kind, options: type[Options], fn: Any, doc: str = "") -> Entry:
    """Register an entry; a name is registered once (a second registration of it is a programming error)."""
    if name in _ENTRIES and _ENTRIES[name].fn is not fn:
        raise ValueError(f"'{name}' is already registered (as a {_ENTRIES[name].kind})")
    entry = Entry(name, kind, options, fn, doc or (getattr(fn, "__doc__", "") or "").strip())
    _ENTRIES[name] = entry
    return entry


def register(name: str, kind: Kind, options: type[Options]) -> Callable[[F], F]:
    """Decorator form of `add` for functions."""
    def deco(fn: F) -> F:
        add(name, kind, options, fn)
        return fn
    return deco


def _load(kinds: Sequence[str] | None = None) -> None:
    """Import the modules that register entries of `kinds` (all by default): a data-free lookup does not
    import the data-driven methods' dependencies."""
    for kind in kinds or PROVIDERS:
        importlib.import_module(PROVIDERS[kind])


def entries(kind: Kind | Sequence[Kind] | None = None) -> list[Entry]:
    kinds = (kind,) if isinstance(kind, str) else kind
    _load(kinds)
    return [e for e in _ENTRIES.values() if kinds is None or e.kind in kinds]


def names(kind: Kind | Sequence[Kind] | None = None) -> list[str]:
    return [e.name for e in entries(kind)]


def get(name: str, kind: Kind | Sequence[Kind] | None = None) -> Entry:
    """The entry `name` (of one of `kind`), or a one-line error listing the known names."""
    kinds = (kind,) if isinstance(kind, str) else kind
    entry = _ENTRIES.get(name)
    if entry is None or (kinds is not None and entry.kind not in kinds):
        _load()
        entry = _ENTRIES.get(name)
    if entry is None or (kinds is not None and entry.kind not in kinds):
        word = KIND_WORDS[kinds[0]] if kinds else "method or defense"
        known = names(kinds)
        hint = ""
        if entry is not None:
            hint = f"; '{name}' is a {KIND_WORDS[entry.kind]} of kind {entry.kind}"
            if entry.kind == "data_driven":
                hint += " (needs heads and unlabeled inputs: Python API safemerge.run_pool_method)"
        raise SafeMergeError(f"unknown {word} '{name}' (known: {', '.join(known)}){hint}")
    return entry


def options_error(name: str, e: ValidationError, where: str = "", word: str = "merge method") -> str:
    """A pydantic error on an options model as one line naming the option (the first one that is wrong)."""
    errs = e.errors()
    err = errs[0]
    key = str(err["loc"][0]) if err["loc"] else "(options)"
    loc = ".".join([key, *(str(x) for x in err["loc"][1:] if isinstance(x, int))])
    others = {str(x["loc"][0]) for x in errs if x["loc"]} - {key}
    prefix = f"{where}: " if where else ""
    more = f" (+{len(others)} more)" if others else ""
    if err["type"] == "extra_forbidden":
        return f"{prefix}{word} '{name}' has no parameter '{loc}'{more}"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:
        return f"{prefix}{word} '{name}': {msg}{more}"
    return f"{prefix}{word} '{name}': parameter '{loc}': {msg}{more}"


def validate(name: str, params: dict[str, Any] | None = None, kind: Kind | Sequence[Kind] | None = None,
             where: str = "") -> Options:
    """The options of `name` from `params`, validated against its options model (one-line errors)."""
    entry = get(name, kind)
    try:
        return entry.options.model_validate(dict(params or {}))
    except ValidationError as e:
        raise SafeMergeError(options_error(name, e, where, KIND_WORDS[entry.kind])) from None


def describe(entry: Entry) -> list[tuple[str, str, str]]:
    """(option, type, default) rows of an entry's options model, for `safemerge methods`."""
    rows = []
    for k, f in entry.options.model_fields.items():
        ann = f.annotation
        tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        default = "required" if f.is_required() else repr(f.default)
        rows.append((k, tname, default))
    return rows
