"""The one spec grammar of drafters, acceptance rules and KV presses, and their registries.

    NAME[:ARG...][:KEY=VALUE[,KEY=VALUE...]]     e.g. ngram:num_tokens=8,max_ngram=3
                                                      model:NAME:k=4,mode=fixed
                                                      hybrid:model:qwen2.5-coder-0.5b
                                                      loose:topk=5,lam=0.7
                                                      pyramidkv:budget=0.1:beta=10
    PART+PART...                                 e.g. ngram+loose:topk=3

The name is lower-cased. The ":"-parts before the first KEY=VALUE part are the argument (a model
name or path, which may itself hold ":"), the rest are parameters, separated by ",", ";" or ":".
A piece without "=" continues the previous value, so layer lists and paths read naturally:
``layerskip:attn=1-3,5,mlp=4-6`` gives attn="1-3,5", mlp="4-6". Values stay strings here: each
entry's builder converts them with its own bounds; the registry only checks that a value can be
read as its parameter's type.

A Registry maps a name to what builds it (a class or "module:attr", imported on first use); its
Entry tells the parameters (type, default, a line of help), their aliases, whether an argument
is taken, and a one-line description. Every mistake is a one-line VeridraftError that names the
bad part and lists the valid choices, sorted.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .errors import VeridraftError

# -- values ---------------------------------------------------------------------------------------


def bad_value(owner: str, name: str, value, want: str) -> VeridraftError:
    return VeridraftError(f"{owner}: {name} must be {want}, got {value!r}")


def _bounds(lo, hi) -> str:
    return (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")


def as_int(owner: str, name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An integer from a spec string or a Python value ("8", 8, "8.0" and 8.0 alike)."""
    want = "an integer" + _bounds(lo, hi)
    if isinstance(value, bool):
        raise bad_value(owner, name, value, want)
    x = value
    try:
        if isinstance(value, str):
            try:
                x = int(value.strip())
            except ValueError:  # "8.0" reads as 8, as the Python value 8.0 does
                x = float(value.strip())
        out = int(x)
    except (TypeError, ValueError, OverflowError):
        raise bad_value(owner, name, value, want) from None
    if out != x or (lo is not None and out < lo) or (hi is not None and out > hi):
        raise bad_value(owner, name, value, want)
    return out


def as_float(
    owner: str, name: str, value, lo: float | None = None, hi: float | None = None
) -> float:
    want = "a number" + _bounds(lo, hi)
    if isinstance(value, bool):
        raise bad_value(owner, name, value, want)
    try:
        out = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise bad_value(owner, name, value, want) from None
    if out != out or (lo is not None and out < lo) or (hi is not None and out > hi):
        raise bad_value(owner, name, value, want)
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def as_bool(owner: str, name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise bad_value(owner, name, value, "true or false")


def as_choice(owner: str, name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    v = value.strip().lower() if isinstance(value, str) else value
    if v not in choices:
        raise bad_value(owner, name, value, "one of " + ", ".join(sorted(choices)))
    return v


@dataclass(frozen=True)
class Param:
    """One parameter of an entry: its type (int, float, bool or str), its default (None: chosen
    at build time, see help), a line of help, and for a str the accepted values if fixed."""

    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()

    def check(self, owner: str, name: str, value) -> None:
        """A string value that cannot be read as this type is a one-line error. Python values
        (generate()'s keyword options) and None go to the builder, which converts them."""
        if not isinstance(value, str):
            return
        if self.choices:
            as_choice(owner, name, value, self.choices)
        elif self.type is bool:
            as_bool(owner, name, value)
        elif self.type is int:
            as_int(owner, name, value)
        elif self.type is float:
            as_float(owner, name, value)


# -- the grammar ----------------------------------------------------------------------------------


@dataclass
class Spec:
    """One parsed part: "model:NAME:k=4" -> Spec("model", "NAME", {"k": "4"})."""

    name: str
    arg: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        out = self.name + (f":{self.arg}" if self.arg is not None else "")
        if self.params:
            out += ":" + ",".join(f"{k}={v}" for k, v in self.params.items())
        return out


_KEY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$", re.S)


def parse(text: str, kind: str = "spec", valid: Iterable[str] = ()) -> Spec:
    """ "model:NAME:k=4,mode=fixed" -> Spec("model", "NAME", {"k": "4", "mode": "fixed"}).
    `kind` and `valid` word the error of an empty spec."""
    if not isinstance(text, str) or not text.strip():
        raise VeridraftError(f"empty {kind} spec; valid: {_listed(valid)}")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise VeridraftError(f"{kind} spec {text!r} has no name before ':'")
    parts = rest.split(":") if rest else []
    first = next((i for i, p in enumerate(parts) if _KEY.match(p)), len(parts))
    arg = None
    if first:
        arg = ":".join(parts[:first]).strip()
        if not arg:
            raise VeridraftError(f"{kind} spec {text!r} has an empty argument between ':'s")
    return Spec(name, arg, _parse_params(text, ":".join(parts[first:]), kind))


def _parse_params(text: str, params_text: str, kind: str) -> dict[str, str]:
    """KEY=VALUE pieces; the text starts with one (parse() makes sure of it)."""
    params: dict[str, str] = {}
    key = ""
    pieces = re.split(r"([,;:])", params_text)
    for i in range(0, len(pieces), 2):
        piece, sep = pieces[i], pieces[i - 1] if i else ","
        m = _KEY.match(piece)
        if m:
            key = m.group(1).lower()
            if key in params:
                raise VeridraftError(f"{kind} spec {text!r} sets {key!r} twice")
            params[key] = m.group(2).strip()
        elif piece.strip():  # continues the value: a path keeps its ":", a list reads with ","
            glue = ":" if sep == ":" else ","
            params[key] = f"{params[key]}{glue}{piece.strip()}" if params[key] else piece.strip()
    return params


def split(text: str) -> list[str]:
    """ "ngram:num_tokens=8+loose:topk=5" -> ["ngram:num_tokens=8", "loose:topk=5"]."""
    parts = [p.strip() for p in text.split("+")]
    if len(parts) > 1 and not all(parts):
        raise VeridraftError(f"method {text!r} has an empty part around '+'")
    return parts


def parse_all(text: str, kind: str = "spec") -> list[Spec]:
    """Every "+"-joined part of a method spec, parsed."""
    return [parse(p, kind) for p in split(text)]


def join(specs: Iterable[Spec | str]) -> str:
    return "+".join(str(s) for s in specs)


# -- registries -----------------------------------------------------------------------------------


@dataclass
class Entry:
    """What a registry knows of a name. `arg`: True an argument is needed, False none is taken,
    None optional. `forwards`: parameters it does not know go on to a part it wraps (hybrid).
    `target` builds it: each registry's factory knows how (from_spec, from_params, a call)."""

    name: str
    description: str = ""
    params: dict[str, Param] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    arg: bool | None = False
    usage: str = ""
    forwards: bool = False
    target: Any = None


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _params_of(obj) -> dict[str, Param]:
    declared = getattr(obj, "params", ())
    if isinstance(declared, Mapping):
        return dict(declared)
    # a tuple of names: the types and defaults of a dataclass's fields, else untyped
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    out = {}
    for name in declared:
        f = fields.get(name)
        if f is None:
            out[name] = Param()
            continue
        t = f.type if isinstance(f.type, type) else _TYPES.get(str(f.type), str)
        out[name] = Param(t, None if f.default is dataclasses.MISSING else f.default)
    return out


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split())
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


def entry_of(obj, name: str | None = None) -> Entry:
    """The Entry of a class (or any object) that declares `name`, `params` (a dict of Params, or
    a tuple of names), `aliases`, `takes_arg`, `usage` and `description` as attributes."""
    if isinstance(obj, Entry):
        return obj
    description = getattr(obj, "description", "")
    if not description:  # the first sentence of its module's docstring
        module = sys.modules.get(getattr(obj, "__module__", ""), None)
        description = _first_sentence(getattr(module, "__doc__", None))
    return Entry(
        name=name or getattr(obj, "name", ""),
        description=description,
        params=_params_of(obj),
        aliases=dict(getattr(obj, "aliases", {}) or {}),
        arg=getattr(obj, "takes_arg", False),
        usage=getattr(obj, "usage", ""),
        forwards=bool(getattr(obj, "forwards_params", False)),
        target=obj,
    )


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    return ", ".join(names) if names else "none"


class Registry(MutableMapping):
    """name -> what builds it; entries given as "module:attr" are imported when first read
    (relative to `package`). `registry[name]` is the builder itself, `registry.entry(name)` its
    Entry. `kind` names the registry in errors ("drafter", "rule", "kv press")."""

    def __init__(self, kind: str, entries: dict[str, Any], package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, Any] = dict(entries)
        self._described: dict[str, Entry] = {}

    def _load(self, name: str) -> Any:
        obj = self._entries[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module, self.package), attr)
            self._entries[name] = obj
        return obj

    def __getitem__(self, name: str) -> Any:
        obj = self._load(name)
        return obj.target if isinstance(obj, Entry) else obj

    def __setitem__(self, name: str, obj: Any) -> None:
        self._entries[name] = obj
        self._described.pop(name, None)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]
        self._described.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise VeridraftError(f"unknown {self.kind} {name!r}; valid: {_listed(self)}")
        if name not in self._described:
            self._described[name] = entry_of(self._load(name), name)
        return self._described[name]

    def parse(self, text: str) -> Spec:
        return parse(text, self.kind, self)

    def resolve(
        self, spec: Spec | str, options: Mapping[str, Any] | None = None
    ) -> tuple[Entry, dict[str, Any]]:
        """(entry, its parameters under their canonical names): the spec's, then `options`
        over them. Checks the argument, the parameter names and the types of string values."""
        if isinstance(spec, str):
            spec = self.parse(spec)
        e = self.entry(spec.name)
        if e.arg is True and spec.arg is None:
            raise VeridraftError(f"{e.name} needs an argument: {e.usage or e.name + ':ARG'}")
        if e.arg is False and spec.arg is not None:
            raise VeridraftError(
                f"{e.name} takes no argument, got {spec.arg!r}; parameters go as "
                f"{e.name}:KEY=VALUE,... (valid: {_listed(e.params)})"
            )
        params = self._canonical(e, spec.params, f"{self.kind} spec {str(spec)!r}")
        params.update(self._canonical(e, options or {}, None))
        return e, params

    def _canonical(self, e: Entry, given: Mapping[str, Any], where: str | None) -> dict:
        out: dict[str, Any] = {}
        for key, value in given.items():
            k = e.aliases.get(key, key)
            p = e.params.get(k)
            if p is None and not e.forwards:
                raise VeridraftError(
                    f"unknown parameter {key!r} for {e.name}; valid: {_listed(e.params)}"
                )
            if where is not None and k in out:
                raise VeridraftError(f"{where} sets {k!r} twice")
            if p is not None:
                p.check(e.name, k, value)
            out[k] = value
        return out
