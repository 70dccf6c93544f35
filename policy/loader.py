"""Read policy TOML (version 1) into a `Policy`, reporting every problem as "FILE:LINE: message".

This is the only policy module that touches the filesystem.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from xskbroker.common.records import field, record

from . import trust
from .fields import FIELDS, Invalid
from .model import KINDS, Action, Admin, Policy, QueueSet, Quota, Rule
from .sizes import parse_size

__all__ = ["DEFAULT_POLICY_PATH", "Document", "PolicyError", "load_documents", "load_policy", "parse_policy",
           "parse_size"]

DEFAULT_POLICY_PATH = "/etc/xskbroker/policy.toml"
DROPIN_DIR = "policy.d"
# A policy file is read whole and parsed on the broker's loop (a reload): a huge one (a sparse file, a log named
# *.toml) would hold the loop for as long as reading and parsing it takes, and its memory
MAX_FILE_BYTES = 4 << 20

_TOP_KEYS = ("version", "allow", "deny", "quota", "admin")
_PRINCIPAL_KEYS = ("users", "groups")
_DENY_KEYS = ("name", *_PRINCIPAL_KEYS, "cgroups", "labels", "interfaces", "queues", "kinds")
_ALLOW_KEYS = (*_DENY_KEYS, "max_queues", "max_umem", "exclusive", "raise_memlock")
_QUOTA_KEYS = ("name", *_PRINCIPAL_KEYS, "max_queues", "max_umem", "max_connections", "max_requests_per_second")
_ADMIN_KEYS = (*_PRINCIPAL_KEYS, "revoke_signal")

# A table header line: [name] or [[name]], name possibly quoted; used only to find line numbers.
_HEADER_RE = re.compile(r"""^\s*(\[\[?)\s*["']?([^\]"']*?)["']?\s*\]""")
_SYNTAX_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")

# One file as it was parsed: (path, text, the TOML document tomllib made of the text)
Document = tuple[str, str, dict[str, Any]]


class PolicyError(Exception):
    """A policy that cannot be used; `errors` holds every problem found, each "FILE:LINE: message"."""

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


@record
class _Parsed:
    """One file's result: the rules that validated, every rule's name and where, and the errors."""

    filename: str
    rules: list[Rule] = field(default_factory=list)
    quotas: list[Quota] = field(default_factory=list)
    admin: Admin | None = None
    names: list[tuple[str, int]] = field(default_factory=list)  # (name, line of its name key)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line, message)
    doc: dict[str, Any] | None = None  # the TOML document, None when the text is not TOML


class _Lines:
    """Line numbers for tables and keys, found by scanning the raw text (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")  # tomllib counts only "\n" as a line break
        self.headers: list[tuple[int, str, bool]] = []  # (1-based line, table name, is array of tables)
        for no, line in enumerate(self.lines, 1):
            m = _HEADER_RE.match(line)
            if m:
                self.headers.append((no, m.group(2).strip(), m.group(1) == "[["))

    def rule_header(self, action: str, index: int) -> int | None:
        found = [no for no, name, is_array in self.headers if is_array and name == action]
        return found[index] if index < len(found) else None

    def key(self, key: str, after: int = 0) -> int | None:
        """First line after line `after` (a header, or 0 for top level) and before the next header
        that assigns `key`."""
        key_re = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
        for no in range(after + 1, len(self.lines) + 1):
            line = self.lines[no - 1]
            if _HEADER_RE.match(line):
                return None
            if key_re.match(line):
                return no
        return None

    def top_level(self, key: str) -> int:
        found = self.key(key)
        if found is not None:
            return found
        # A top-level key may also be spelled as a table, e.g. a mistaken [allow].
        return next((no for no, name, _ in self.headers if name == key), 1)

    @property
    def last(self) -> int:
        return max(1, len(self.lines) - (self.lines[-1] == ""))


def _suggest(key: str, valid: Iterable[str]) -> str:
    import difflib  # only for error messages: kept off the broker's start-up

    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_table(table: dict[str, Any], allowed: tuple[str, ...], label: str, line_of: Callable[[str], int],
                 errors: list[tuple[int, str]], allow_only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate each key of a table with its parser (policy.fields); problems go to `errors` with their line."""
    values: dict[str, Any] = {}
    for key in table:
        if key not in allowed:
            msg = (f"{key!r} is only valid in [[allow]] rules" if key in allow_only
                   else f"unknown key {key!r}{_suggest(key, allowed)}")
            errors.append((line_of(key), f"{label}: {msg}"))
            continue
        try:
            values[key] = FIELDS[key](table[key])
        except Invalid as e:
            errors.append((line_of(key), f"{label}: {key}: {e}"))
    return values


def _parse_quota(table: dict[str, Any], index: int, lines: _Lines, out: _Parsed) -> None:
    header = lines.rule_header("quota", index) or lines.top_level("quota")
    errors: list[tuple[int, str]] = []
    label = f"[[quota]] #{index + 1}"

    def line_of(key: str) -> int:
        return lines.key(key, header) or header

    values = _parse_table(table, _QUOTA_KEYS, label, line_of, errors)
    if "name" in values:
        out.names.append((values["name"], line_of("name")))
    else:
        errors.append((header, f"{label}: missing required key 'name'"))
    if not values.get("users") and not values.get("groups"):
        errors.append((header, f"{label}: needs 'users' or 'groups' (users = [\"*\"]: every user, each separately)"))
    if not any(k in values for k in _QUOTA_KEYS[3:]):
        errors.append((header, f"{label}: sets no limit ({', '.join(_QUOTA_KEYS[3:])})"))
    if errors:
        out.errors.extend(errors)
        return
    limits = {k: values[k] for k in _QUOTA_KEYS[3:] if k in values}
    out.quotas.append(Quota(name=values["name"], users=values.get("users", frozenset()),
                            groups=values.get("groups", frozenset()), source=f"{out.filename}:{header}", **limits))


def _parse_admin(table: Any, lines: _Lines, out: _Parsed) -> None:
    header = next((no for no, name, is_array in lines.headers if name == "admin" and not is_array), 1)
    if not isinstance(table, dict):
        out.errors.append((header, "'admin' must be written as an [admin] table"))
        return
    errors: list[tuple[int, str]] = []
    values = _parse_table(table, _ADMIN_KEYS, "[admin]", lambda k: lines.key(k, header) or header, errors)
    if errors:
        out.errors.extend(errors)
        return
    out.admin = Admin(users=values.get("users", frozenset({"0"})), groups=values.get("groups", frozenset()),
                      revoke_signal=values.get("revoke_signal"), source=f"{out.filename}:{header}")


def _parse_rule(table: dict[str, Any], action: Action, index: int, lines: _Lines, out: _Parsed) -> None:
    found = lines.rule_header(action, index)
    header = found or lines.top_level(action)  # inline arrays of tables have no [[...]] header
    label = f"[[{action}]] #{index + 1}"
    errors: list[tuple[int, str]] = []

    def line_of(key: str) -> int:
        return lines.key(key, header) or header

    allowed = _ALLOW_KEYS if action == "allow" else _DENY_KEYS
    values: dict[str, Any] = {}
    if "name" in table:  # first, so later messages can use it
        values = _parse_table({"name": table["name"]}, allowed, label, line_of, errors)
        if "name" in values:
            label = f"rule {values['name']!r}"
            out.names.append((values["name"], line_of("name")))
    rest = {k: v for k, v in table.items() if k != "name"}
    values.update(_parse_table(rest, allowed, label, line_of, errors, allow_only=_ALLOW_KEYS))

    if "name" not in table:
        if action == "allow":
            errors.append((header, f"{label}: missing required key 'name'"))
        else:
            # Unnamed deny rules are allowed; a name derived from the location keeps logs unambiguous.
            values["name"] = f"deny@{out.filename}:{header}" + ("" if found else f"#{index + 1}")
            out.names.append((values["name"], header))
    given = [k for k in _PRINCIPAL_KEYS if k in table]
    if not given:
        errors.append((header, f"{label}: needs 'users' or 'groups' (users = [\"*\"] means anyone)"))
    elif all(k in values for k in given) and not any(values[k] for k in given):
        errors.append((header, f"{label}: 'users' and 'groups' are empty, so the rule matches no one"))
    if "interfaces" not in table:
        errors.append((header, f"{label}: missing required key 'interfaces'"))
    if values.get("exclusive") and "queues" in values:
        errors.append((line_of("queues"), f"{label}: an exclusive rule gives whole interfaces; drop 'queues'"))

    if errors:
        out.errors.extend(errors)
        return
    out.rules.append(
        Rule(
            name=values["name"],
            action=action,
            users=values.get("users", frozenset()),
            groups=values.get("groups", frozenset()),
            interfaces=values["interfaces"],
            queues=values.get("queues", QueueSet(None)),
            # A deny without kinds covers every kind; an allow without kinds grants only the safest.
            kinds=values.get("kinds", frozenset(KINDS) if action == "deny" else frozenset({"bound"})),
            max_queues=values.get("max_queues"),
            max_umem=values.get("max_umem"),
            exclusive=values.get("exclusive", False),
            raise_memlock=values.get("raise_memlock"),
            cgroups=values.get("cgroups", ()),
            labels=values.get("labels", ()),
            source=f"{out.filename}:{header}",
        )
    )


def _huge_int(value: Any) -> bool:
    """Whether a TOML value is or holds an integer outside TOML's 64 bits."""
    if isinstance(value, dict):
        return any(_huge_int(v) for v in value.values())
    if isinstance(value, list):
        return any(_huge_int(v) for v in value)
    return isinstance(value, int) and not -(1 << 63) <= value < 1 << 63


def _parse_text(text: str, filename: str, doc: dict[str, Any] | None = None) -> _Parsed:
    """One file's rules; DOC, when given, is what tomllib made of this very text before (the broker's last
    good copy keeps it), validated here as a fresh parse would be."""
    out = _Parsed(filename)
    lines = _Lines(text)
    if doc is None:
        # imported here: tomllib compiles its regular expressions at import, ~6 ms of a socket-activated start
        # that the last good copy's documents spare it (broker/lastgood.py)
        import tomllib

        try:
            doc = tomllib.loads(text)
        except RecursionError:
            # tomllib recurses once per nested array or inline table: a few hundred levels exhaust the stack, and
            # that escaped every caller (the broker's reload handler included) as no PolicyError does
            out.errors.append((lines.last, "TOML nested too deeply (arrays or inline tables inside one another)"))
            return out
        except ValueError as e:  # TOMLDecodeError, or an integer of over 4300 digits that int() refused
            msg = str(e)
            m = _SYNTAX_POS_RE.search(msg)
            if m:
                line, column = int(m.group(1)), m.group(2)
                out.errors.append((line, f"TOML syntax error: {msg[: m.start()]} (column {column})"))
            else:
                out.errors.append((lines.last, f"TOML syntax error: {msg}"))
            return out
    out.doc = doc

    # TOML's integers are 64-bit and a bigger one must be an error; tomllib reads any (hex has no digit limit), and
    # printing one of thousands of digits in a message or a refusal's reason raised ValueError
    huge = [key for key, value in doc.items() if _huge_int(value)]
    if huge:
        out.errors += [(lines.top_level(key), f"{key!r}: an integer over 64 bits (TOML integers are 64-bit)")
                       for key in huge]
        return out

    for key in doc:
        if key not in _TOP_KEYS:
            msg = f"unknown top-level key {key!r}{_suggest(key, _TOP_KEYS)}"
            out.errors.append((lines.top_level(key), msg))
    version = doc.get("version")
    if "version" not in doc:
        out.errors.append((1, "missing 'version = 1' at the top of the file"))
    elif type(version) is not int or version != 1:  # bool and float 1.0 compare equal to 1
        msg = f"unsupported version {version!r} (this broker reads version 1)"
        out.errors.append((lines.top_level("version"), msg))

    for action in ("allow", "deny"):
        tables = doc.get(action, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            out.errors.append((lines.top_level(action), f"'{action}' must be written as [[{action}]] tables"))
            continue
        for index, table in enumerate(tables):
            _parse_rule(table, action, index, lines, out)
    quotas = doc.get("quota", [])
    if not isinstance(quotas, list) or not all(isinstance(t, dict) for t in quotas):
        out.errors.append((lines.top_level("quota"), "'quota' must be written as [[quota]] tables"))
    else:
        for index, table in enumerate(quotas):
            _parse_quota(table, index, lines, out)
    if "admin" in doc:
        _parse_admin(doc["admin"], lines, out)
    # Rules were parsed allow-first; put them back in file order for listings and "first deny" reports.
    out.rules.sort(key=lambda r: int(r.source.rsplit(":", 1)[1]))
    return out


def _merge(files: list[_Parsed], errors: list[str], sources: list[str]) -> Policy:
    first_seen: dict[str, str] = {}
    for parsed in files:
        found = list(parsed.errors)
        for name, line in parsed.names:
            where = f"{parsed.filename}:{line}"
            if name in first_seen:
                found.append((line, f"duplicate rule name {name!r} (first defined at {first_seen[name]})"))
            else:
                first_seen[name] = where
        errors.extend(f"{parsed.filename}:{line}: {msg}" for line, msg in sorted(found, key=lambda e: e[0]))
    admins = [p for p in files if p.admin is not None]
    if len(admins) > 1:
        errors.append(f"{admins[1].filename}: a second [admin] table (the first is in {admins[0].filename})")
    if errors:
        raise PolicyError(errors)
    return Policy(rules=tuple(r for p in files for r in p.rules), sources=tuple(sources),
                  quotas=tuple(q for p in files for q in p.quotas),
                  admin=admins[0].admin if admins and admins[0].admin else Admin())


def parse_policy(text: str, filename: str = "<policy>") -> Policy:
    """Parse one policy document; raises PolicyError listing every problem."""
    return _merge([_parse_text(text, filename)], [], [filename])


def parse_documents(documents: list[tuple[str, str]], docs: Mapping[tuple[str, str], dict[str, Any]] | None = None
                    ) -> Policy:
    """Parse and merge (filename, text) documents as load_policy merges a file and its policy.d/ (the
    broker's last-good copy holds them so); raises PolicyError listing every problem. DOCS: see load_documents."""
    known = docs or {}
    return _merge([_parse_text(text, name, known.get((name, text))) for name, text in documents], [],
                  [name for name, _ in documents])


def _read(path: str, errors: list[str], name: str | None = None, dir_fd: int | None = None) -> str | None:
    """The file's text if it may be trusted (checked on the opened file: no swap after the check).
    With dir_fd, `name` is opened relative to that directory and `path` names it in messages."""
    try:
        fd = os.open(name or path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
    except OSError as e:
        errors.append(f"{path}: cannot read: {e.strerror or e}")
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = os.strerror(errno.EISDIR) if stat.S_ISDIR(st.st_mode) else "not a regular file"
            errors.append(f"{path}: cannot read: {kind}")
            return None
        unsafe = trust.problem(path, st)
        if unsafe:
            errors.append(unsafe)
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            errors.append(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB, which no policy needs: not read")
            return None
    except OSError as e:
        errors.append(f"{path}: cannot read: {e.strerror or e}")
        return None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        errors.append(f"{path}:{line}: not valid UTF-8 (byte {e.start})")
        return None


def _unsafe_chain(path: str, errors: list[str]) -> bool:
    """Whether a directory above `path` (as written or resolved) may not be trusted; each problem is added to
    errors once, however many files it stands above."""
    problems = trust.dir_chain_problems(path)
    errors += [p for p in problems if p not in errors]
    return bool(problems)


def _dropins(dropin: str, errors: list[str]) -> list[tuple[str, str | None]]:
    """(path, text) of each policy.d/*.toml in name order, read through one fd of the checked directory."""
    try:
        fd = os.open(dropin, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        errors.append(f"{dropin}: cannot read: {e.strerror or e}")
        return []
    try:
        unsafe = trust.problem(dropin, os.fstat(fd))
        if unsafe:
            errors.append(unsafe)
            return []
        # Hidden files are skipped: editors and atomic writers leave them behind half-written.
        names = sorted(n for n in os.listdir(fd) if n.endswith(".toml") and not n.startswith("."))
        out: list[tuple[str, str | None]] = []
        for n in names:
            path = os.path.join(dropin, n)
            # a drop-in that links elsewhere is believed only if the directories above its target are too: whoever
            # can write one of them can swap the target (for another file, a device, a mount that hangs the open)
            if stat.S_ISLNK(os.stat(n, dir_fd=fd, follow_symlinks=False).st_mode) and _unsafe_chain(path, errors):
                out.append((path, None))
                continue
            out.append((path, _read(path, errors, n, fd)))
        return out
    except OSError as e:
        errors.append(f"{dropin}: cannot read: {e.strerror or e}")
        return []
    finally:
        os.close(fd)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read `path` and then, if present, the sibling policy.d/*.toml files in name order.

    Rule names must be unique across all files. Raises PolicyError listing every problem in every file.
    """
    return load_documents(path)[0]


def load_documents(path: str | os.PathLike[str], docs: Mapping[tuple[str, str], dict[str, Any]] | None = None
                   ) -> tuple[Policy, list[Document]]:
    """load_policy's policy, and each file as it was read and parsed: what runs, for the last good copy.

    DOCS maps (path, text) to the TOML document parsed from exactly that text before: a file whose text is
    found there is validated from it instead of parsed again."""
    # os.path rather than pathlib, whose import would add a tenth to the broker's start-up
    main = os.fspath(path)
    errors: list[str] = []
    # nothing under a directory others can write is opened: they choose what the path names (a device whose open
    # acts, a mount that hangs it), and the policy is refused whatever the file holds
    texts = [(main, None if _unsafe_chain(main, errors) else _read(main, errors))]
    dropin = os.path.join(os.path.dirname(main), DROPIN_DIR)
    # a policy.d that is there but no directory (a link to one not mounted yet, a file) is an error, not an empty
    # policy.d: the deny rules it holds would be dropped without a word
    if os.path.lexists(dropin) and not _unsafe_chain(dropin, errors):
        texts += _dropins(dropin, errors)
    known = docs or {}
    parsed: list[_Parsed] = []
    documents: list[Document] = []
    for file, text in texts:
        if text is not None:
            one = _parse_text(text, file, known.get((file, text)))
            parsed.append(one)
            if one.doc is not None:
                documents.append((file, text, one.doc))
    policy = _merge(parsed, errors, [file for file, _, _ in documents])
    return policy, documents
