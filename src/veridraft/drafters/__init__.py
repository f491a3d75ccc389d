"""Drafters and the spec strings that name them.

    make_drafter("ngram", model)                              # prompt lookup, defaults
    make_drafter("ngram:num_tokens=8,max_ngram=4", model)
    make_drafter("layerskip", model)                          # the model's default skip set
    make_drafter("layerskip:attn=8-20;mlp=10-14", model)      # any skip set (0-based layers)
    make_drafter("model:smollm2-135m-l8", model)              # a separate draft model
    make_drafter("model:NAME:k=4,mode=fixed", model)
    make_drafter("universal:smollm2-135m:align=lcd", model)   # a draft with another tokenizer
    make_drafter("snapkv:budget=513,layerskip=true", model)   # sparse-cache self-speculation
    make_drafter("streaming:qwen2.5-coder-0.5b", model)      # a draft model on a sparse view
    make_drafter("recycle", model)                            # Token Recycling (token trees)
    make_drafter("suffix:datastore=stdlib", model)            # SuffixDecoding, plus retrieval
    make_drafter("hybrid:model:qwen2.5-coder-0.5b", model)   # suffix trees, else a draft model
    make_drafter("eagle:k=4,mode=chain", model)               # a trained EAGLE-3 head
    make_drafter(my_drafter, model)                           # a Drafter instance: itself
    make_drafter(None, model)                                 # plain decoding: None

Spec grammar: ``METHOD[:ARG][:KEY=VALUE[,KEY=VALUE...]]``. Parameters are separated by "," or
";"; a piece without "=" continues the previous value, so layer lists read naturally:
``layerskip:attn=1-3,5,mlp=4-6`` gives attn="1-3,5", mlp="4-6". Keyword options passed to
`generate()` (e.g. ``num_tokens=8``) override the spec's parameters. Unknown methods and
parameters, and bad values, raise a one-line VeridraftError that lists the valid choices.

New drafters register a class in DRAFTERS (or a "module:Class" path, imported on first use);
the class provides `name`, `takes_arg`, `params` (accepted parameter names), `aliases` (other names
-> canonical) and `from_spec(model, arg, params[, env]) -> Drafter`, where `env` is the
`veridraft.draft.DraftEnv` the API layer built (a model loader, the tuned profiles, the cost
model). Drafter modules are imported only when their method is used.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator, MutableMapping
from typing import Any

from ..draft import DecodeContext, Draft, DraftEnv, Drafter, default_env, set_default_env
from ..errors import VeridraftError

__all__ = [
    "DRAFTERS",
    "DecodeContext",
    "Draft",
    "DraftEnv",
    "Drafter",
    "LayerSkipDrafter",
    "ModelDrafter",
    "NgramDrafter",
    "RecycleDrafter",
    "SuffixDrafter",
    "UniversalDrafter",
    "forget_earlier_generations",
    "make_drafter",
    "parse_spec",
    "set_default_env",
]


class _Registry(MutableMapping):
    """name -> drafter class; entries given as "module:Class" are imported when first read."""

    def __init__(self, entries: dict[str, type | str]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> type:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module, __name__), attr)
            self._entries[name] = entry
        return entry

    def __setitem__(self, name: str, cls: type | str) -> None:
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"DRAFTERS({', '.join(self._entries)})"


DRAFTERS: MutableMapping[str, type] = _Registry(
    {
        "ngram": ".ngram:NgramDrafter",
        "layerskip": ".layerskip:LayerSkipDrafter",
        "model": ".model:ModelDrafter",
        "universal": ".universal:UniversalDrafter",
        "streaming": ".streaming:StreamingDrafter",
        "snapkv": ".snapkv:SnapKVDrafter",
        "retrieval": ".retrieval:RetrievalDrafter",
        "topk": ".topk:TopKDrafter",
        "pruned": ".pruned:PrunedDrafter",
        "recycle": ".recycle:RecycleDrafter",
        "suffix": ".suffix:SuffixDrafter",
        "hybrid": ".hybrid:HybridDrafter",
        "eagle": ".eagle:EagleDrafter",
    }
)
_CLASSES = {
    "NgramDrafter": "ngram",
    "LayerSkipDrafter": "layerskip",
    "ModelDrafter": "model",
    "UniversalDrafter": "universal",
    "RecycleDrafter": "recycle",
    "SuffixDrafter": "suffix",
}


# Modules whose drafters remember earlier generations of the process (SuffixDecoding's global
# trie of earlier outputs, Token Recycling's hot-start table), each with the dict that holds it.
_PROCESS_MEMORY = {".suffix": "_GLOBAL", ".recycle": "_TABLES"}


def forget_earlier_generations() -> None:
    """Clear what drafters keep from earlier generations in this process. A benchmark calls it
    after its warm-up and before each repeat: otherwise the measured run of a question the
    warm-up (or an earlier repeat) already answered would draft from that very answer."""
    import sys

    for module, attr in _PROCESS_MEMORY.items():
        loaded = sys.modules.get(__name__ + module)
        if loaded is not None:
            getattr(loaded, attr).clear()


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return DRAFTERS[_CLASSES[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_KEY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$", re.S)


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """ "model:NAME:k=4,mode=fixed" -> ("model", "NAME", {"k": "4", "mode": "fixed"}).

    The method name is lower-cased; values stay strings (each drafter converts and checks its
    own). The last ":"-separated part is the parameter list when it starts with KEY=.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise VeridraftError(f"empty draft spec; valid methods: {', '.join(sorted(DRAFTERS))}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise VeridraftError(f"draft spec {spec!r} has no method name before ':'")
    arg: str | None = None
    params: dict[str, str] = {}
    if rest:
        head, sep, tail = rest.rpartition(":")
        if _KEY.match(tail):
            params = _parse_params(spec, tail)
            arg = head if sep else None
        else:
            arg = rest
        if arg is not None:
            arg = arg.strip()
            if not arg:
                raise VeridraftError(f"draft spec {spec!r} has an empty argument between ':'s")
    return name, arg, params


def _parse_params(spec: str, text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    key = None
    for piece in re.split(r"[,;]", text):
        m = _KEY.match(piece)
        if m:
            key = m.group(1).lower()
            if key in params:
                raise VeridraftError(f"draft spec {spec!r} sets {key!r} twice")
            params[key] = m.group(2).strip()
        elif key is not None:
            if piece.strip():
                params[key] = f"{params[key]},{piece.strip()}" if params[key] else piece.strip()
        elif piece.strip():
            raise VeridraftError(f"draft spec {spec!r}: expected KEY=VALUE, got {piece!r}")
    return params


def _is_drafter(obj: Any) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("prefill", "propose", "update"))


def _canonical(cls: type, params: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # a drafter that wraps another (hybrid) passes the parameters it does not know on to it
    forwards = getattr(cls, "forwards_params", False)
    for key, value in params.items():
        k = cls.aliases.get(key, key)
        if k not in cls.params and not forwards:
            raise VeridraftError(
                f"{cls.name}: unknown parameter {key!r}{where}; valid: {', '.join(cls.params)}"
            )
        out[k] = value
    return out


def make_drafter(spec, model, env: DraftEnv | None = None, **options) -> Drafter | None:
    """None -> None (plain decoding); a Drafter -> itself; a spec string -> a new drafter.

    `model` is the target (a LoadedModel, or a native network for tests); `env` the resources
    drafters may use (default: `veridraft.draft.default_env(model)`); `options`
    override the spec's parameters.
    """
    if spec is None:
        if options:
            raise VeridraftError(
                f"draft options {', '.join(sorted(options))} given without a draft method; "
                f"pass draft= one of {', '.join(sorted(DRAFTERS))}"
            )
        return None
    if not isinstance(spec, str):
        if _is_drafter(spec):
            if options:
                raise VeridraftError(
                    f"draft options {', '.join(sorted(options))} cannot be applied to a "
                    "Drafter instance; configure the instance instead"
                )
            return spec
        raise VeridraftError(
            f"draft must be None, a method spec string or a Drafter instance, got "
            f"{type(spec).__name__}"
        )
    name, arg, params = parse_spec(spec)
    cls = DRAFTERS.get(name)
    if cls is None:
        raise VeridraftError(
            f"unknown draft method {name!r} in {spec!r}; valid: {', '.join(sorted(DRAFTERS))}"
        )
    if cls.takes_arg and arg is None:
        raise VeridraftError(f"{name} needs an argument: {cls.usage}")
    if cls.takes_arg is False and arg is not None:  # None: an optional argument
        raise VeridraftError(
            f"{name} takes no argument, got {arg!r}; parameters go as {name}:KEY=VALUE,... "
            f"(valid: {', '.join(cls.params)})"
        )
    merged = _canonical(cls, params, f" in {spec!r}")
    merged.update(_canonical(cls, options, ""))
    if "env" not in inspect.signature(cls.from_spec).parameters:
        return cls.from_spec(model, arg, merged)
    if env is None:
        env = default_env(model)
    return cls.from_spec(model, arg, merged, env=env)
