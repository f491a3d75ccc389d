"""veridraft drafter spec -> vLLM `speculative_config`, for users who move to a GPU server.

Mapped where vLLM has the method (read from vLLM's `vllm/config/speculative.py`, 2026):

- `ngram[:num_tokens=K,max_ngram=N,min_ngram=M]` -> `{"method": "ngram",
  "num_speculative_tokens": K, "prompt_lookup_max": N, "prompt_lookup_min": M}`.
- `model:NAME[:k=K]` -> `{"method": "draft_model", "model": HUB_ID_OR_PATH,
  "num_speculative_tokens": K}`; catalog names become their Hugging Face ids.
- `suffix[...]` -> `{"method": "suffix", ...}` (vLLM's SuffixDecoding, via arctic-inference).
- `eagle[:head=PATH][:k=K]` -> `{"method": "eagle3", "model": HEAD_FOLDER,
  "num_speculative_tokens": K}`: the head is already EAGLE-3's folder format (drafters/eagle.py);
  without head= it is the model's newest trained head (`veridraft train head`).

No vLLM equivalent: `layerskip` (self-speculation with skipped layers), `universal` (a draft
with another tokenizer by text round-trip), and truncated catalog drafts such as
`smollm2-135m-l8`, which exist only inside veridraft. Those raise a VeridraftError that says so.
Parameters vLLM lacks (ngram's `short_num_tokens`, `match`; the draft model's adaptive `mode`)
are listed in the notes, since vLLM will behave differently there.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..errors import VeridraftError

# Catalog name -> the Hugging Face repository vLLM would load (the catalog ships GGUF copies).
HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
}

NO_EQUIVALENT = {
    "layerskip": "self-speculation by skipping the target's own layers; vLLM's closest are "
    "trained heads (eagle, eagle3, mtp, medusa), which need a trained checkpoint",
    "universal": "drafting with a model of another tokenizer by text round-trip; vLLM's "
    "draft_model with use_heterogeneous_vocab intersects vocabularies instead, a different "
    "method with different acceptance",
    "ar": "plain decoding: run vLLM without --speculative-config",
}

# veridraft's own defaults where the spec leaves a parameter out (see drafters/ngram.py,
# drafters/model.py); vLLM has no default for num_speculative_tokens, so it is always written.
_NGRAM_DEFAULTS = {"num_tokens": 10, "max_ngram": 3, "min_ngram": 1}
_MODEL_DEFAULT_K = {"dynamic": 16, "heuristic": 5, "fixed": 4}
_EAGLE_DEFAULT_K = 5  # drafters/eagle.py's k


def hub_id(name: str) -> str:
    return HUB_IDS.get(name, name)


def _int(method: str, key: str, value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise VeridraftError(f"{method}: {key} must be an integer, got {value!r}") from None
    if v < 1:
        raise VeridraftError(f"{method}: {key} must be >= 1, got {v}")
    return v


def _canonical(method: str, params: dict[str, str]) -> dict[str, str]:
    from ..drafters import DRAFTERS

    cls = DRAFTERS[method]
    out = {}
    for key, value in params.items():
        k = cls.aliases.get(key, key)
        if k not in cls.params:
            raise VeridraftError(
                f"{method}: unknown parameter {key!r}; valid: {', '.join(cls.params)}"
            )
        out[k] = value
    return out


def _model_folder(model: str) -> Path | None:
    """The folder of a catalog model or an HF folder path, without loading it."""
    from ..models import catalog

    if model in catalog.CATALOG:
        return catalog.model_dir(model)
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _eagle(arg: str | None, params: dict[str, str], model: str | None) -> tuple[dict, list]:
    from ..defaults import DEFAULT_MODEL
    from ..drafters.eagle import check_vllm_loadable, find_head, head_spec, train_hint

    p = _canonical("eagle", params)
    model = model or DEFAULT_MODEL
    folder = find_head(_model_folder(model), head_spec(arg, p.get("head")))
    if folder is None or not (folder / "config.json").is_file():
        raise VeridraftError(
            f"eagle: no trained head for {model}; train one with `{train_hint(model)}` or pass "
            "eagle:head=PATH"
        )
    check_vllm_loadable(folder)  # a variant head (gated fusion, deeper) has no vLLM loader
    notes = []
    if p.get("mode", "tree") == "tree":
        notes.append(
            "veridraft's eagle drafts a token tree by default; vLLM's eagle3 drafts a chain "
            "unless speculative_token_tree is set"
        )
    window = p.get("window") or _trained_window(folder)
    if window is not None and str(window) != "full":
        notes.append(
            f"veridraft's eagle attends over a window of {window} of the head's rows; vLLM's "
            "eagle3 runs the same head with full attention over every position"
        )
    k = _int("eagle", "k", str(p.get("k", _EAGLE_DEFAULT_K)))
    cfg = {"method": "eagle3", "model": str(folder.resolve()), "num_speculative_tokens": k}
    return cfg, notes


def _trained_window(folder: Path) -> int | None:
    """The window a head was trained for (config.json's LONG_KEY), None for full attention."""
    import json

    from ..drafters.eagle import LONG_KEY

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (cfg.get(LONG_KEY) or {}).get("window")


def speculative_config(spec: str, model: str | None = None) -> tuple[dict, list[str]]:
    """(vLLM speculative_config, notes on what differs) for a veridraft drafter spec; `model`
    (default: veridraft's default model) is where `eagle` looks for its trained head."""
    from ..drafters import DRAFTERS, parse_spec

    method, arg, params = parse_spec(spec)
    if method in NO_EQUIVALENT:
        raise VeridraftError(f"{method!r} has no vLLM equivalent: {NO_EQUIVALENT[method]}")
    notes: list[str] = []
    if method == "ngram":
        if arg is not None:
            raise VeridraftError(f"ngram takes no argument, got {arg!r}")
        p = {**_NGRAM_DEFAULTS, **_canonical("ngram", params)}
        cfg = {
            "method": "ngram",
            "num_speculative_tokens": _int("ngram", "num_tokens", str(p["num_tokens"])),
            "prompt_lookup_max": _int("ngram", "max_ngram", str(p["max_ngram"])),
            "prompt_lookup_min": _int("ngram", "min_ngram", str(p["min_ngram"])),
        }
        if cfg["prompt_lookup_min"] > cfg["prompt_lookup_max"]:
            raise VeridraftError("ngram: min_ngram must be <= max_ngram")
        if "num_tokens" not in params and "k" not in params:
            notes.append(
                "num_tokens not given: used veridraft's default 10 (veridraft picks it from the "
                "measured cost model when one exists; vLLM needs it explicitly)"
            )
        for key in ("short_num_tokens", "match"):
            if key in p:
                notes.append(f"ngram:{key} has no vLLM equivalent and is dropped")
        notes.append(
            "veridraft proposes at most short_num_tokens (default 2) after a match shorter than "
            "max_ngram; vLLM proposes num_speculative_tokens after any match"
        )
        return cfg, notes
    if method == "model":
        if arg is None:
            raise VeridraftError("model needs a draft model name: model:NAME[:k=K]")
        p = _canonical("model", params)
        draft = arg.strip()
        if draft not in HUB_IDS and "-l" in draft and draft.rsplit("-l", 1)[0] in HUB_IDS:
            raise VeridraftError(
                f"{draft!r} is a truncated catalog model that exists only in veridraft (its first "
                "layers plus the head); vLLM needs a real draft checkpoint of the same vocabulary"
            )
        mode = p.get("mode", "dynamic")
        k = p.get("num_tokens")
        cfg = {
            "method": "draft_model",
            "model": hub_id(draft),
            "num_speculative_tokens": _int(
                "model", "num_tokens", str(k if k is not None else _MODEL_DEFAULT_K.get(mode, 4))
            ),
        }
        if mode != "fixed":
            notes.append(
                f"veridraft's {mode} draft length has no vLLM equivalent: vLLM drafts "
                "num_speculative_tokens every step"
            )
        for key in ("threshold", "draft_sampling", "draft_vocab"):
            if key in p:
                notes.append(f"model:{key} has no vLLM equivalent and is dropped")
        return cfg, notes
    if method == "suffix":
        cfg = {"method": "suffix"}
        keys = {
            "max_tree_depth": "suffix_decoding_max_tree_depth",
            "max_cached_requests": "suffix_decoding_max_cached_requests",
            "max_spec_factor": "suffix_decoding_max_spec_factor",
            "min_token_prob": "suffix_decoding_min_token_prob",
        }
        for key, value in params.items():
            name = keys.get(key, key if key.startswith("suffix_decoding_") else None)
            if name is None:
                notes.append(f"suffix:{key} has no vLLM equivalent and is dropped")
                continue
            cfg[name] = json.loads(value) if value.replace(".", "", 1).isdigit() else value
        notes.append("vLLM's suffix method needs `pip install arctic-inference`")
        return cfg, notes
    if method == "eagle":
        return _eagle(arg, params, model)
    valid = sorted({"ngram", "model", "suffix"} | set(DRAFTERS) | set(NO_EQUIVALENT))
    raise VeridraftError(f"unknown draft method {method!r} in {spec!r}; valid: {', '.join(valid)}")


def vllm_command(model: str, spec: str, port: int = 8000) -> tuple[str, list[str]]:
    """The `vllm serve` command line that runs `model` with the drafter `spec`, and the notes."""
    cfg, notes = speculative_config(spec, model)
    cmd = (
        f"vllm serve {shlex.quote(hub_id(model))} --port {port} "
        f"--speculative-config {shlex.quote(json.dumps(cfg, separators=(',', ':')))}"
    )
    return cmd, notes
