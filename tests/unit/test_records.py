"""common.records against the stdlib: the same small classes made by @dataclass and by @record must construct,
compare, hash, print, freeze, inherit, replace and match alike, fail alike on bad declarations, and run the
same generated code (issue 13, cold start: records replace dataclasses on the serve path)."""

from __future__ import annotations

import dataclasses
import dis
import json
import subprocess
import sys
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from xskbroker.common import records


def _shapes(deco: Callable[..., Any], fld: Callable[..., Any]) -> dict[str, Any]:
    """The matrix: one class per feature, made with the given decorator and field()."""

    @deco
    class Plain:
        a: int
        b: str = "x"

    @deco(frozen=True)
    class Frozen:
        LIMIT: ClassVar[int] = 3  # not a field
        OTHER: typing.ClassVar[str] = "no"  # nor this
        a: int
        items: tuple[int, ...] = fld(default_factory=tuple)
        note: str = fld(default="n", repr=False)
        cache: dict[str, int] | None = fld(default=None, compare=False)
        tag: str = fld(default="t", kw_only=True, metadata={"omit": True})

    @deco(frozen=True)
    class Child(Frozen):
        b: int = 0
        note: str = "redefined"  # keeps its place, between items and cache

    @deco(kw_only=True)
    class KwBase:
        k: int
        m: list[int] = fld(default_factory=list)

    @deco
    class KwChild(KwBase):
        p: int  # positional although it follows kw_only fields with defaults
        q: int = fld(default=5, kw_only=True)

    @deco
    class Post:
        a: int
        b: int = 0

        def __post_init__(self) -> None:
            self.doubled = self.a * 2

    @deco(frozen=True, eq=False, repr=False)
    class Bare:
        a: int

    @deco(frozen=True)
    class Own:
        a: int

        def __eq__(self, other: object) -> bool:
            return True

        def __repr__(self) -> str:
            return "own"

    @deco(frozen=True)
    class OwnHash:
        a: int

        def __hash__(self) -> int:
            return 7

    @deco
    class OwnHashMutable:
        a: int

        def __hash__(self) -> int:
            return 8

    class Plainly(Frozen):  # not itself a record: frozen for Frozen's fields only
        pass

    @deco
    class Empty:
        pass

    @deco
    class Holder:
        inner: list[Any]

    return {c.__name__: c for c in (Plain, Frozen, Child, KwBase, KwChild, Post, Bare, Own, OwnHash,
                                    OwnHashMutable, Plainly, Empty, Holder)}


STD = _shapes(dataclasses.dataclass, dataclasses.field)
OURS = _shapes(records.record, records.field)

# (class, args, kwargs): instances built both ways; pairs of the same class are compared both ways
SAMPLES: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("Plain", (1,), {}), ("Plain", (1, "y"), {}), ("Plain", (), {"a": 1, "b": "x"}),
    ("Frozen", (1,), {}), ("Frozen", (1, (2, 3)), {}), ("Frozen", (1, (2,), "m", {"c": 1}), {"tag": "u"}),
    ("Frozen", (1, (2,), "other note"), {}), ("Frozen", (1,), {"cache": None, "tag": "t"}),
    ("Child", (1,), {}), ("Child", (1, (), "x", None, 4), {"tag": "z"}), ("Child", (1, (), "redefined"), {}),
    ("KwBase", (), {"k": 1}), ("KwBase", (), {"k": 1, "m": [2]}),
    ("KwChild", (3,), {"k": 1}), ("KwChild", (3,), {"k": 1, "q": 6, "m": [1]}),
    ("Post", (2,), {}), ("Post", (2, 1), {}),
    ("Bare", (1,), {}), ("Own", (1,), {}), ("Own", (2,), {}), ("OwnHash", (1,), {}), ("OwnHash", (2,), {}),
    ("OwnHashMutable", (1,), {}), ("Plainly", (1,), {}), ("Plainly", (1, (2,)), {}),
    ("Empty", (), {}), ("Holder", ([1],), {}),
]


def _both(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    return STD[name](*args, **kwargs), OURS[name](*args, **kwargs)


def _outcome(fn: Callable[[], Any]) -> Any:
    """What fn gives, or the class and message of what it raises (a record's error class counts as the
    stdlib's: FrozenInstanceError)."""
    try:
        return fn()
    except Exception as e:
        kind = "FrozenInstanceError" if type(e).__name__ == "FrozenInstanceError" else type(e).__name__
        return (kind, str(e))


def _names(fields: tuple[Any, ...], missing: Any) -> list[tuple[Any, ...]]:
    """The fields' options, each module's MISSING as None."""
    return [(f.name, f.type, None if f.default is missing else f.default,
             None if f.default_factory is missing else f.default_factory, f.kw_only, f.compare, f.repr,
             dict(f.metadata)) for f in fields]


@pytest.mark.parametrize("name", sorted(OURS))
def test_fields_and_match_args_as_dataclasses(name: str) -> None:
    std, ours = STD[name], OURS[name]
    assert _names(records.fields(ours), records.MISSING) == _names(dataclasses.fields(std), dataclasses.MISSING)
    assert ours.__match_args__ == std.__match_args__
    for attr in ("a", "b", "note", "tag", "items", "m", "LIMIT"):  # class attributes: defaults, none for factories
        assert _outcome(lambda a=attr: getattr(ours, a)) == _outcome(lambda a=attr: getattr(std, a))
    assert ("__hash__" in vars(ours), vars(ours).get("__hash__") is None) == \
        ("__hash__" in vars(std), vars(std).get("__hash__") is None)


@pytest.mark.parametrize(("name", "args", "kwargs"), SAMPLES)
def test_each_instance_as_dataclasses(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    std, ours = _both(name, args, kwargs)
    if name != "Bare":  # object's repr carries the address
        assert repr(ours) == repr(std)
    else:
        assert repr(ours).startswith(f"<{__name__}._shapes.<locals>.Bare object at ")
    assert _outcome(lambda: hash(ours)) == _outcome(lambda: hash(std)) or name in ("Bare",)
    assert vars(ours) == vars(std)  # every field set, __post_init__'s attribute too
    assert ours.__eq__(object()) is std.__eq__(object())  # NotImplemented, or Own's True
    assert records.asdict(ours) == dataclasses.asdict(std)
    assert _outcome(lambda: records.replace(ours, a=5) == records.replace(ours, a=5)) == \
        _outcome(lambda: dataclasses.replace(std, a=5) == dataclasses.replace(std, a=5))
    assert _outcome(lambda: repr(records.replace(ours, a=5))) == _outcome(lambda: repr(dataclasses.replace(std, a=5)))
    assert _outcome(lambda: records.replace(ours, nope=1)) == _outcome(lambda: dataclasses.replace(std, nope=1))
    for change in (lambda o: setattr(o, "a", 9), lambda o: delattr(o, "a"), lambda o: setattr(o, "new", 1)):
        assert _outcome(lambda c=change: c(ours)) == _outcome(lambda c=change: c(std))
        assert vars(ours) == vars(std)
    if name in ("Frozen", "Child"):
        with pytest.raises(AttributeError):
            ours.a = 2


@pytest.mark.parametrize(("name", "args", "kwargs"), SAMPLES)
def test_equality_and_hash_across_samples_as_dataclasses(name: str, args: tuple[Any, ...],
                                                         kwargs: dict[str, Any]) -> None:
    std_a, ours_a = _both(name, args, kwargs)
    for other_name, other_args, other_kwargs in SAMPLES:
        std_b, ours_b = _both(other_name, other_args, other_kwargs)
        assert (ours_a == ours_b) == (std_a == std_b), (other_name, other_args, other_kwargs)
        assert (ours_a != ours_b) == (std_a != std_b)
        if type(ours_a) is type(ours_b) and name != "Bare":  # Bare: object's hash, by address
            assert _outcome(lambda a=ours_a, b=ours_b: hash(a) == hash(b)) == \
                _outcome(lambda a=std_a, b=std_b: hash(a) == hash(b))


def test_another_class_of_the_same_fields_is_not_equal() -> None:
    @records.record
    class Twin:
        a: int
        b: str = "x"

    assert OURS["Plain"](1) != Twin(1) and OURS["Plain"](1).__eq__(Twin(1)) is NotImplemented
    assert OURS["Plain"](1) == OURS["Plain"](1)
    assert OURS["Frozen"](1) != OURS["Child"](1)  # a subclass is another class


def test_factories_make_one_value_per_instance() -> None:
    one, two = OURS["KwBase"](k=1), OURS["KwBase"](k=1)
    one.m.append(1)
    assert two.m == [] and one.m == [1]


def test_recursive_repr_as_dataclasses() -> None:
    std, ours = STD["Holder"]([]), OURS["Holder"]([])
    std.inner.append(std)
    ours.inner.append(ours)
    assert repr(ours) == repr(std) and repr(ours).endswith(".Holder(inner=[...])")


def test_match_as_dataclasses() -> None:
    def where(value: Any, kw_child: type, child: type) -> Any:
        match value:
            case kw_child(p):
                return ("kw", p)
            case child(a, items, note):
                return ("child", a, items, note)
        return None

    for name, args, kwargs in SAMPLES:
        if name in ("KwChild", "Child"):
            std, ours = _both(name, args, kwargs)
            assert where(ours, OURS["KwChild"], OURS["Child"]) == where(std, STD["KwChild"], STD["Child"]) \
                is not None


def test_signatures_as_dataclasses() -> None:
    # positional / keyword-only order, defaults, what is missing: the TypeErrors name the same arguments
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("Plain", (), {}), ("Plain", (1, "y", 3), {}), ("Frozen", (1, (), "n", None, "tag"), {}),
        ("KwBase", (1,), {}), ("KwChild", (), {"k": 1}), ("KwChild", (1, 2), {"k": 1}), ("Empty", (1,), {}),
        ("Child", (), {"a": 1, "tag": "x", "b": 2, "zz": 1})]
    fresh = _shapes(records.record, records.field)  # the first call of each goes through its stand-in
    for name, args, kwargs in calls:
        ours = _outcome(lambda n=name, a=args, k=kwargs: fresh[n](*a, **k))
        assert ours == _outcome(lambda n=name, a=args, k=kwargs: OURS[n](*a, **k))
        std = _outcome(lambda n=name, a=args, k=kwargs: STD[n](*a, **k))
        assert isinstance(ours, tuple) and ours == std


def _declare(deco: Callable[..., Any], fld: Callable[..., Any], case: str) -> Any:
    if case == "default-order":
        @deco
        class A:
            a: int = 0
            b: int
        return A
    if case == "mutable-default":
        @deco
        class B:
            a: list[int] = []  # noqa: RUF012
        return B
    if case == "frozen-from-mutable":
        @deco
        class Base:
            a: int

        @deco(frozen=True)
        class C(Base):
            b: int
        return C
    if case == "mutable-from-frozen":
        @deco(frozen=True)
        class Base2:
            a: int

        @deco
        class D(Base2):
            b: int
        return D
    if case == "unannotated-field":
        @deco
        class E:
            a = fld(default=1)
        return E
    if case == "both-defaults":
        return fld(default=1, default_factory=list)
    if case == "frozen-own-setattr":
        @deco(frozen=True)
        class F:
            a: int

            def __setattr__(self, name: str, value: Any) -> None:
                pass
        return F
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["default-order", "mutable-default", "frozen-from-mutable", "mutable-from-frozen",
                                  "unannotated-field", "both-defaults", "frozen-own-setattr"])
def test_bad_declarations_fail_as_in_dataclasses(case: str) -> None:
    ours = _outcome(lambda: _declare(records.record, records.field, case))
    std = _outcome(lambda: _declare(dataclasses.dataclass, dataclasses.field, case))
    assert isinstance(std, tuple), std
    assert ours == (std[0], std[1].replace("dataclass", "record")), (ours, std)


def test_helpers_refuse_what_is_not_a_record() -> None:
    for fn in (records.fields, records.asdict, records.replace):
        with pytest.raises(TypeError):
            fn(object())
    with pytest.raises(TypeError):
        records.replace(OURS["Plain"])  # a class is not an instance
    assert records.is_record(OURS["Plain"]) and records.is_record(OURS["Plain"](1)) and not records.is_record(1)
    meta = records.fields(OURS["Frozen"])[-1].metadata
    with pytest.raises(TypeError):
        meta["omit"] = False
    assert records.fields(OURS["Frozen"](1)) == records.fields(OURS["Frozen"])


def _ops(fn: Any) -> list[str]:
    return [i.opname for i in dis.get_instructions(fn)]


@pytest.mark.parametrize("name", ["Plain", "Frozen", "Child", "KwChild", "Post", "Empty"])
def test_generated_code_has_dataclasses_shape(name: str) -> None:
    # creating, comparing and hashing are on every grant's path: the same instructions as dataclasses', once
    # the first instance has replaced the class's stand-ins
    std, ours = STD[name], _shapes(records.record, records.field)[name]
    args, kwargs = next((a, k) for n, a, k in SAMPLES if n == name)
    assert _ops(ours.__init__) != _ops(std.__init__)  # a stand-in until then
    ours(*args, **kwargs)
    assert _ops(ours.__init__) == _ops(std.__init__)
    assert _ops(ours.__eq__) == _ops(std.__eq__)
    if std.__hash__ is not None:
        assert _ops(ours.__hash__) == _ops(std.__hash__)
    assert ours.__init__.__defaults__ is not None or std.__init__.__defaults__ is None
    assert ours.__init__.__qualname__ == std.__init__.__qualname__


def test_one_compile_per_class_at_first_use_and_no_heavy_imports() -> None:
    probe = """
import builtins, json, sys
before = set(sys.modules)
from xskbroker.common import records
loaded = sorted(set(sys.modules) - before)
compiled = []
real = builtins.exec
builtins.exec = lambda *a: (compiled.append(1), real(*a))[1]
@records.record(frozen=True)
class A:
    a: int
    b: int = records.field(default=0, kw_only=True)
@records.record
class B:
    a: int
declared = len(compiled)
one, two = A(1), A(1, b=2)
assert one != two and hash(one) != hash(two) and A(1) == one and hash(A(1)) == hash(one) and B(1) == B(1)
print(json.dumps([loaded, declared, len(compiled)]))
"""
    loaded, declared, used = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                                       text=True, check=True).stdout)
    assert (declared, used) == (0, 2)  # nothing compiled until a class is used, then one source per class
    assert not {"dataclasses", "inspect", "ast", "re", "copy", "tokenize"} & set(loaded), loaded
