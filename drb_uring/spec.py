"""Typed, validated specifications that cross a process boundary.

Every helper process drb starts (the pair daemon, the broker, a worker, a
domain's init, a ring peer, a workload) gets exactly one JSON object on its
command line, parsed into a frozen dataclass of this kind in the child. The
parser trusts nothing: unknown keys, missing keys and wrong types are
refused by name, and each spec's ``check()`` validates the values.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

from drb_uring.errors import DrbError


class SpecError(DrbError, ValueError):
    """A specification is malformed or has an invalid value."""


def _conforms(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _conforms(a, k) and _conforms(b, v) for a, b in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Base of every spec: subclasses add fields and may override check()."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not _conforms(v, hints[f.name]):
                raise SpecError(f"{type(self).__name__}.{f.name}: expected "
                                f"{hints[f.name]}, got {v!r}")
        self.check()

    def check(self) -> None:
        """Validate the values (types are already checked)."""

    @classmethod
    def from_dict(cls, d: object):
        if not isinstance(d, dict):
            raise SpecError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SpecError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:       # a required field is missing
            raise SpecError(f"{cls.__name__}: {e}") from None

    @classmethod
    def from_json(cls, text: str):
        try:
            return cls.from_dict(json.loads(text))
        except ValueError as e:
            if isinstance(e, SpecError):
                raise
            raise SpecError(f"{cls.__name__}: not JSON: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
