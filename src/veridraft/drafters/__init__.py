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

Spec grammar (veridraft.spec, shared with the acceptance rules and the KV presses):
``METHOD[:ARG][:KEY=VALUE[,KEY=VALUE...]]``. Parameters are separated by ",", ";" or ":"; a piece
without "=" continues the previous value, so layer lists read naturally:
``layerskip:attn=1-3,5,mlp=4-6`` gives attn="1-3,5", mlp="4-6". Keyword options passed to
`generate()` (e.g. ``num_tokens=8``) override the spec's parameters. Unknown methods and
parameters, and bad values, raise a one-line VeridraftError that lists the valid choices.

New drafters register a class in DRAFTERS (or a "module:Class" path, imported on first use);
the class provides `name`, `description` (one line), `takes_arg` (True, False, or None for an
optional argument), `params` (name -> veridraft.spec.Param: type, default, help), `aliases`
(other names -> canonical) and `from_spec(model, arg, params[, env]) -> Drafter`, where `env` is
the `veridraft.draft.DraftEnv` the API layer built (a model loader, the tuned profiles, the cost
model). Drafter modules are imported only when their method is used.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..draft import DecodeContext, Draft, DraftEnv, Drafter, default_env, set_default_env
from ..errors import VeridraftError
from ..spec import Registry

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


DRAFTERS = Registry(
    "drafter",
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
    },
    package=__name__,
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


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """ "model:NAME:k=4,mode=fixed" -> ("model", "NAME", {"k": "4", "mode": "fixed"}).

    The method name is lower-cased; values stay strings (each drafter converts and checks its
    own). The grammar is veridraft.spec's.
    """
    s = DRAFTERS.parse(spec)
    return s.name, s.arg, s.params


def _is_drafter(obj: Any) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("prefill", "propose", "update"))


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
    parsed = DRAFTERS.parse(spec)
    entry, params = DRAFTERS.resolve(parsed, options)
    cls = entry.target
    if "env" not in inspect.signature(cls.from_spec).parameters:
        return cls.from_spec(model, parsed.arg, params)
    if env is None:
        env = default_env(model)
    return cls.from_spec(model, parsed.arg, params, env=env)
