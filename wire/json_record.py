"""Record: a frozen record that is one JSON object of protocol v1, written and read back validated.

A record lists its JSON keys in wire order (its fields); to_wire() gives the object, from_wire() checks a
received one against the fields' type hints (checks made once per class, from the hints) and keeps keys this
side does not know in `extra`, so a newer peer's additions pass through. wire.replies builds the replies on it.
"""

from __future__ import annotations

import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

from xskbroker.common import records
from xskbroker.common.records import field, record
from xskbroker.wire.errors import BrokerError, ErrorCode


def _omit_if_none(value: Any, record: Any) -> bool:
    return value is None


def optional(omit: Callable[[Any, Any], bool] = _omit_if_none) -> Any:
    """An optional key: None when absent, and left out of the message when omit(value, record) says so."""
    return field(default=None, metadata={"omit": omit})


# Records are frozen records whose ==, hash() and repr() are written once, in Record, exactly as record
# would generate them, instead of generated for every class (eq=False, repr=False below): a socket-activated
# broker pays for every class's generated code before its first grant.
@record(frozen=True, eq=False, repr=False)
class Record:
    """A JSON object with a known set of keys, in wire order; unknown keys ride along in `extra`."""

    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = _shape(type(self))[0]
        return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in _shape(type(self))[1]))

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        values = ", ".join(f"{n}={getattr(self, n)!r}" for n in _shape(type(self))[2])
        return f"{type(self).__qualname__}({values})"

    @classmethod
    def from_wire(cls, obj: Any, where: str = "reply", given: dict[str, Any] | None = None) -> typing.Self:
        """The record read from its JSON object; `given` are more fields, not from the object (a reply's id)."""
        if not isinstance(obj, dict):
            raise bad_reply(where, "an object")
        values: dict[str, Any] = given or {}
        for name, required, exact, check in _reader(cls):
            if name in obj:
                value = obj[name]
                # on every grant's path: a scalar of exactly its type needs no check (nor its message)
                values[name] = value if type(value) is exact else check(value, f"{where}.{name}")
            elif required:
                raise BrokerError(ErrorCode.BAD_REPLY, f"broker reply: {where} lacks {name!r}")
        known = _KNOWN[cls]
        read = len(values) - (len(given) if given else 0)
        return cls(**values, extra={k: v for k, v in obj.items() if k not in known} if len(obj) > read else {})

    def to_wire(self) -> dict[str, Any]:
        # on the grant path: a precomputed (name, omit) list per class, scalars copied as they are
        out: dict[str, Any] = {}
        for name, omit in _plan(type(self)):
            value = getattr(self, name)
            if omit is None or not omit(value, self):
                out[name] = value if type(value) in _SCALARS else _to_json(value)
        if self.extra:
            out.update(self.extra)
        return out


_SHAPES: dict[type, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {}


def _shape(cls: type) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The fields a record's ==, hash() and repr() would use, in field order (found once per class)."""
    got = _SHAPES.get(cls)
    if got is None:
        fields = records.fields(cls)
        got = _SHAPES[cls] = (tuple(f.name for f in fields if f.compare),
                              tuple(f.name for f in fields if f.compare),  # records have no hash= of their own
                              tuple(f.name for f in fields if f.repr))
    return got


_FIELDS: dict[type, tuple[tuple[records.Field, Any], ...]] = {}
_KNOWN: dict[type, frozenset[str]] = {}  # the names in _FIELDS[cls]
_EXACT = frozenset({int, str, bool})  # hints a JSON value of exactly that type satisfies as it is


def _wire_fields(cls: type) -> tuple[tuple[records.Field, Any], ...]:
    """A reply class's wire fields with their resolved type hints (resolved once per class)."""
    got = _FIELDS.get(cls)
    if got is None:
        hints = typing.get_type_hints(cls)
        got = _FIELDS[cls] = tuple((f, hints[f.name]) for f in records.fields(cls)
                                   if f.name not in ("extra", "req_id", "raw"))
        _KNOWN[cls] = frozenset(f.name for f, _ in got)
    return got


_READERS: dict[type, tuple[tuple[str, bool, type | None, Checker], ...]] = {}


def _reader(cls: type) -> tuple[tuple[str, bool, type | None, Checker], ...]:
    """What from_wire reads for a class: each wire field's name, whether it is required, the scalar type a value
    may have to be taken as it is (None: always checked), and its check (made once per class)."""
    got = _READERS.get(cls)
    if got is None:
        got = _READERS[cls] = tuple(
            (f.name, f.default is records.MISSING and f.default_factory is records.MISSING,
             hint if hint in _EXACT else None, _checker(hint)) for f, hint in _wire_fields(cls))
    return got


_PLANS: dict[type, tuple[tuple[str, Callable[[Any, Any], bool] | None], ...]] = {}
_SCALARS = frozenset({int, str, bool, float, type(None)})


def _plan(cls: type) -> tuple[tuple[str, Callable[[Any, Any], bool] | None], ...]:
    """What to_wire writes for a class: each wire field's name and its omit test (made once per class)."""
    got = _PLANS.get(cls)
    if got is None:
        got = _PLANS[cls] = tuple((f.name, f.metadata.get("omit")) for f, _ in _wire_fields(cls))
    return got


def _to_json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def bad_reply(where: str, what: str) -> BrokerError:
    return BrokerError(ErrorCode.BAD_REPLY, f"broker reply: {where} must be {what}")


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


Checker = Callable[[Any, str], Any]
_CHECKERS: dict[Any, Checker] = {}


def _checker(hint: Any) -> Checker:
    """The check of one type hint, made from the hint once (typing's introspection is slow, and every grant reply a
    client reads goes through these): it returns the value as the hint says (lists become tuples, objects
    records), or raises BrokerError bad-reply."""
    got = _CHECKERS.get(hint)
    if got is None:
        got = _CHECKERS[hint] = _make_checker(hint)
    return got


def _make_checker(hint: Any) -> Checker:
    if hint is Any:
        return lambda value, where: value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        nullable = type(None) in args
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None, not None: X's own message says what is wrong inside it
            inner = _checker(options[0])
            return lambda value, where: None if value is None and nullable else inner(value, where)
        checks = [_checker(a) for a in args]
        names = " or ".join(_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args)

        def union(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            for check in checks:
                try:
                    return check(value, where)
                except BrokerError:
                    continue
            raise bad_reply(where, names)
        return union
    if origin is tuple:
        item = _checker(typing.get_args(hint)[0])

        def items(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise bad_reply(where, "a list")
            return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))
        return items
    if origin in (dict, Mapping):
        args = typing.get_args(hint)
        entry = _checker(args[1]) if args and args[1] is not Any else None

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, dict):
                raise bad_reply(where, "an object")
            return value if entry is None else {k: entry(v, f"{where}.{k}") for k, v in value.items()}
        return mapping
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_wire
    if hint is float:  # a JSON number: 0 may come as an integer
        def ok(value: Any) -> bool:
            return isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is int:  # bool is an int subclass: never accept it where a number is meant
        def ok(value: Any) -> bool:
            return type(value) is int
    else:
        def ok(value: Any) -> bool:
            return isinstance(value, hint)
    what = _NAMES.get(hint, getattr(hint, "__name__", str(hint)))

    def scalar(value: Any, where: str) -> Any:
        if not ok(value):
            raise bad_reply(where, what)
        return value
    return scalar
