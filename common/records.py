"""Records: the part of `dataclasses` this package uses, at a fraction of its cost at import (issue 13, cold start).

A socket-activated broker imports everything before its first grant. `import dataclasses` brings inspect, ast,
tokenize, re (11-16 ms here), and each @dataclass compiles one function per generated method (and calls
inspect.signature for a class without a docstring): 23-33 ms for the package's ~54 classes. `record` compiles
ONE source per class (__init__, and __eq__/__hash__ when asked for), and only when one of them is first called
(most classes are not used before the first grant); the generated code has the same shape as dataclasses'
(so creating, comparing and hashing cost the same); repr and the frozen guards are shared
closures. It behaves as dataclasses does for what it supports: field order and inheritance (base fields
first, a redefined field keeps its place), default and default_factory, kw_only, ClassVar skipped (string
annotations too), __post_init__, __match_args__, frozen (FrozenInstanceError, an AttributeError), eq
(NotImplemented for another class), hash from the compared fields, recursion-safe repr.
Not supported (nothing here uses them): init=False fields, InitVar, KW_ONLY, order, slots, unsafe_hash.
"""

from __future__ import annotations

import reprlib
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

__all__ = ["MISSING", "Field", "FrozenInstanceError", "asdict", "field", "fields", "is_record", "record", "replace"]

_T = TypeVar("_T")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # no default (nor factory) was given


class _HasFactory:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<factory>"


_HAS_FACTORY: Any = _HasFactory()  # an __init__ parameter's default: call the field's factory
_EMPTY: Mapping[Any, Any] = types.MappingProxyType({})


class FrozenInstanceError(AttributeError):
    """Assigning to or deleting a field of a frozen record."""


class Field:
    """One field of a record, as fields() lists it (the attributes dataclasses.Field has that are used here)."""

    __slots__ = ("compare", "default", "default_factory", "kw_only", "metadata", "name", "repr", "type")

    def __init__(self, default: Any, default_factory: Any, kw_only: Any, compare: bool, repr: bool,
                 metadata: Mapping[Any, Any] | None) -> None:
        self.name: str = ""
        self.type: Any = None
        self.default = default
        self.default_factory = default_factory
        self.kw_only = kw_only  # MISSING until the class decides (its own kw_only)
        self.compare = compare
        self.repr = repr
        self.metadata: Mapping[Any, Any] = _EMPTY if not metadata else types.MappingProxyType(dict(metadata))

    def __repr__(self) -> str:
        return (f"Field(name={self.name!r},type={self.type!r},default={self.default!r},"
                f"default_factory={self.default_factory!r},repr={self.repr!r},compare={self.compare!r},"
                f"metadata={self.metadata!r},kw_only={self.kw_only!r})")


# the overloads say what mypy needs: a field's declared type is what its default or factory gives
@overload
def field(*, default: _T, kw_only: bool = ..., compare: bool = ..., repr: bool = ...,
          metadata: Mapping[Any, Any] | None = ...) -> _T: ...
@overload
def field(*, default_factory: Callable[[], _T], kw_only: bool = ..., compare: bool = ..., repr: bool = ...,
          metadata: Mapping[Any, Any] | None = ...) -> _T: ...
@overload
def field(*, kw_only: bool = ..., compare: bool = ..., repr: bool = ...,
          metadata: Mapping[Any, Any] | None = ...) -> Any: ...
def field(*, default: Any = MISSING, default_factory: Any = MISSING, kw_only: Any = MISSING, compare: bool = True,
          repr: bool = True, metadata: Mapping[Any, Any] | None = None) -> Any:
    """A field's options, as dataclasses.field takes them."""
    if default is not MISSING and default_factory is not MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return Field(default, default_factory, kw_only, compare, repr, metadata)


def fields(class_or_instance: Any) -> tuple[Field, ...]:
    """The record's fields, in order (a class or an instance)."""
    try:
        own = class_or_instance.__record_fields__
    except AttributeError:
        raise TypeError("must be called with a record type or instance") from None
    return tuple(own.values())


def is_record(obj: Any) -> bool:
    """obj is a record class or an instance of one."""
    return hasattr(obj if isinstance(obj, type) else type(obj), "__record_fields__")


def replace(obj: _T, /, **changes: Any) -> _T:
    """A new record like obj with changes made (every field goes through __init__, as in dataclasses.replace)."""
    if not is_record(obj) or isinstance(obj, type):
        raise TypeError("replace() should be called on record instances")
    for name in obj.__record_fields__:  # type: ignore[attr-defined]
        if name not in changes:
            changes[name] = getattr(obj, name)
    return obj.__class__(**changes)


def asdict(obj: Any) -> dict[str, Any]:
    """The record as a dict, records, lists, tuples and dicts inside it converted too, other values deep-copied
    (named tuples are not handled: nothing here puts one in a record)."""
    if not is_record(obj) or isinstance(obj, type):
        raise TypeError("asdict() should be called on record instances")
    import copy  # only doctor's JSON output needs it: not on the serve path

    def inner(value: Any) -> Any:
        if is_record(value) and not isinstance(value, type):
            return {name: inner(getattr(value, name)) for name in value.__record_fields__}
        if isinstance(value, list | tuple):
            return type(value)(inner(v) for v in value)
        if isinstance(value, dict):
            return type(value)((inner(k), inner(v)) for k, v in value.items())
        return copy.deepcopy(value)

    return inner(obj)  # type: ignore[no-any-return]


# ---- the decorator ----------------------------------------------------------------------------------------

@overload
def record(cls: type[_T], /) -> type[_T]: ...
@overload
def record(*, frozen: bool = ..., eq: bool = ..., repr: bool = ...,
           kw_only: bool = ...) -> Callable[[type[_T]], type[_T]]: ...
@typing.dataclass_transform(field_specifiers=(field,))
def record(cls: type[_T] | None = None, /, *, frozen: bool = False, eq: bool = True, repr: bool = True,
           kw_only: bool = False) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Make cls a record: @record or @record(frozen=..., eq=..., repr=..., kw_only=...), as @dataclass."""
    def wrap(c: type[_T]) -> type[_T]:
        return _process(c, frozen, eq, repr, kw_only)

    return wrap if cls is None else wrap(cls)


def _process(cls: type[_T], frozen: bool, eq: bool, repr: bool, kw_only: bool) -> type[_T]:
    own = cls.__dict__
    all_fields: dict[str, Field] = {}
    any_frozen_base = False
    has_record_base = False
    for base in cls.__mro__[-1:0:-1]:  # base fields first, as dataclasses collects them
        base_fields = base.__dict__.get("__record_fields__")
        if base_fields is not None:
            has_record_base = True
            any_frozen_base = any_frozen_base or base.__dict__["__record_frozen__"]
            all_fields.update(base_fields)
    if has_record_base and any_frozen_base != frozen:
        raise TypeError("cannot inherit frozen record from a non-frozen one" if frozen
                        else "cannot inherit non-frozen record from a frozen one")

    annotations = own.get("__annotations__", {})
    module = sys.modules.get(cls.__module__)
    namespace: dict[str, Any] = module.__dict__ if module is not None else {}
    for name, hint in annotations.items():
        if _is_classvar(hint, namespace):
            continue
        value = own.get(name, MISSING)
        if isinstance(value, Field):
            f = value
            if f.default is MISSING:
                delattr(cls, name)  # a factory's field (or one without default) has no class attribute
            else:
                setattr(cls, name, f.default)
        else:
            f = Field(value, MISSING, MISSING, True, True, None)
        f.name, f.type = name, hint
        if f.kw_only is MISSING:
            f.kw_only = kw_only
        if f.default is not MISSING and f.default.__class__.__hash__ is None:
            raise ValueError(f"mutable default {type(f.default)} for field {name} is not allowed: "
                             "use default_factory")
        all_fields[name] = f
    for name, value in own.items():
        if isinstance(value, Field) and name not in annotations:
            raise TypeError(f"{name!r} is a field but has no type annotation")

    cls.__record_fields__ = all_fields  # type: ignore[attr-defined]
    cls.__record_frozen__ = frozen  # type: ignore[attr-defined]
    listed = tuple(all_fields.values())
    compared = [f.name for f in listed if f.compare]
    class_hash = own.get("__hash__", MISSING)
    explicit_hash = not (class_hash is MISSING or (class_hash is None and "__eq__" in own))
    _check_order(listed)
    _install_on_first_use(cls, listed, namespace, frozen, eq and "__eq__" not in own,
                          eq and frozen and not explicit_hash, compared)
    if eq and not frozen and not explicit_hash:
        cls.__hash__ = None  # type: ignore[assignment]  # mutable and compared by value: unhashable, as dataclass
    if repr and "__repr__" not in own:
        cls.__repr__ = _repr_fn(cls, tuple(f.name for f in listed if f.repr))  # type: ignore[method-assign]
    if frozen:
        for name in ("__setattr__", "__delattr__"):
            if name in own:
                raise TypeError(f"Cannot overwrite attribute {name} in class {cls.__name__}")
        cls.__setattr__, cls.__delattr__ = _frozen_fns(cls, tuple(all_fields))  # type: ignore[method-assign]
    if "__match_args__" not in own:
        cls.__match_args__ = tuple(f.name for f in listed if not f.kw_only)  # type: ignore[attr-defined, misc]
    return cls


def _is_classvar(hint: Any, namespace: Mapping[str, Any]) -> bool:
    """hint is ClassVar or ClassVar[...]: a real one or, from `from __future__ import annotations`, a string
    naming ClassVar or typing.ClassVar as the class's module imports it (what dataclasses recognises)."""
    if isinstance(hint, str):
        head = hint.split("[", 1)[0].strip()
        module_name, _, name = head.rpartition(".")
        if name != "ClassVar":
            return False
        if not module_name:
            return namespace.get("ClassVar") is typing.ClassVar
        return namespace.get(module_name.strip()) is typing
    return hint is typing.ClassVar or getattr(hint, "__origin__", None) is typing.ClassVar


def _check_order(listed: tuple[Field, ...]) -> None:
    """A declaration error is the class's, raised where it is defined (as dataclasses does), not at first use."""
    seen_default = False
    for f in listed:
        if f.kw_only:
            continue
        if f.default is MISSING and f.default_factory is MISSING:
            if seen_default:
                raise TypeError(f"non-default argument {f.name!r} follows default argument")
        else:
            seen_default = True


def _install_on_first_use(cls: type, listed: tuple[Field, ...], namespace: dict[str, Any], frozen: bool, eq: bool,
                          hashed: bool, compared: list[str]) -> None:
    """Stand-ins for __init__ (__eq__, __hash__) that compile the real ones when any of them is first called,
    put them on the class and call them: a socket-activated broker defines ~54 records before its first grant
    and creates far fewer, and each compile costs ~0.15 ms. After the first call the class holds exactly what
    dataclasses would have given it."""
    names = [*(["__init__"] if "__init__" not in cls.__dict__ else []), *(["__eq__"] if eq else []),
             *(["__hash__"] if hashed else [])]

    def install() -> dict[str, Any]:
        made = _generate(cls, listed, namespace, frozen, eq, hashed, compared)
        for name, fn in made.items():
            fn.__qualname__ = f"{cls.__qualname__}.{fn.__name__}"
            if name in names:
                setattr(cls, name, fn)
        return made

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        install()["__init__"](self, *args, **kwargs)

    def __eq__(self: Any, other: Any) -> Any:
        return install()["__eq__"](self, other)

    def __hash__(self: Any) -> int:
        return install()["__hash__"](self)  # type: ignore[no-any-return]

    stand_ins = {"__init__": __init__, "__eq__": __eq__, "__hash__": __hash__}
    for name in names:
        fn = stand_ins[name]
        fn.__qualname__ = f"{cls.__qualname__}.{name}"
        setattr(cls, name, fn)


def _generate(cls: type, listed: tuple[Field, ...], namespace: dict[str, Any], frozen: bool, eq: bool,
              hashed: bool, compared: list[str]) -> dict[str, Any]:
    """__init__ (and __eq__, __hash__) compiled from one source: the same code dataclasses generates."""
    names = {f.name for f in listed}
    self_name = "__record_self__" if "self" in names else "self"
    env: dict[str, Any] = {"__record_object__": object, "__record_has_factory__": _HAS_FACTORY}
    params: list[str] = []
    kw_params: list[str] = []
    body: list[str] = []
    for f in listed:  # their order was checked at the class's definition (_check_order)
        value = f.name
        if f.default_factory is not MISSING:
            env[f"__dflt_{f.name}__"] = f.default_factory
            param = f"{f.name}=__record_has_factory__"
            value = f"__dflt_{f.name}__() if {f.name} is __record_has_factory__ else {f.name}"
        elif f.default is not MISSING:
            env[f"__dflt_{f.name}__"] = f.default
            param = f"{f.name}=__dflt_{f.name}__"
        else:
            param = f.name
        if f.kw_only:
            kw_params.append(param)
        else:
            params.append(param)
        body.append(f"  __record_object__.__setattr__({self_name}, {f.name!r}, {value})" if frozen
                    else f"  {self_name}.{f.name} = {value}")
    if hasattr(cls, "__post_init__"):
        body.append(f"  {self_name}.__post_init__()")
    args = ", ".join([self_name, *params, *(["*", *kw_params] if kw_params else [])])
    lines = [f" def __init__({args}):", *(body or ["  pass"])]
    made = ["__init__"]
    if eq:
        mine, theirs = (f"({''.join(f'{p}.{n},' for n in compared)})" for p in ("self", "other"))
        lines += [" def __eq__(self, other):", "  if other.__class__ is self.__class__:",
                  f"   return {mine}=={theirs}", "  return NotImplemented"]
        made.append("__eq__")
    if hashed:
        lines += [" def __hash__(self):", f"  return hash(({''.join(f'self.{n},' for n in compared)}))"]
        made.append("__hash__")
    source = "\n".join([f"def __record_make__({', '.join(env)}):", *lines, f" return {', '.join(made)},"])
    scope: dict[str, Any] = {}
    exec(source, namespace, scope)  # the one compile per class; what it defines goes to scope
    return dict(zip(made, scope["__record_make__"](**env), strict=True))


def _repr_fn(cls: type, names: tuple[str, ...]) -> Callable[[Any], str]:
    @reprlib.recursive_repr()
    def __repr__(self: Any) -> str:
        return f"{self.__class__.__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    __repr__.__qualname__ = f"{cls.__qualname__}.__repr__"
    return __repr__


def _frozen_fns(cls: type, names: tuple[str, ...]) -> tuple[Callable[[Any, str, Any], None],
                                                           Callable[[Any, str], None]]:
    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)  # type: ignore[arg-type]  # mypy: cls is a type

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)  # type: ignore[arg-type]

    return __setattr__, __delattr__
