"""The kvpress peer (NVIDIA's KV-cache compression library, lossy) on the same model through
transformers, in a worker process that runs in a venv of its own.

    kvpress:ar                          transformers greedy decoding in kvpress's venv (baseline)
    kvpress:snapkv:ratio=0.75           SnapKVPress, 75% of the prompt's KV pairs removed
    kvpress:streaming:budget=1024       StreamingLLMPress keeping 1024 prompt positions
    kvpress:NAME[:ratio=R|budget=N]     NAME in PRESSES

`ratio` is kvpress's compression_ratio (the fraction removed); `budget` is the number of prompt
positions kept, turned into a ratio per prompt (1 - budget / prompt length; 0 when the prompt
is shorter), the budget form veridraft's own presses take. Compression happens once, at
prefill, over the whole prompt (`with press(model): model.generate(...)`), and decoding is
greedy on the compressed cache.

kvpress 0.5.5 needs transformers < 5.3, older than veridraft's, so `make setup-kvpress` puts it
in a venv under $VERIDRAFT_HOME/peers/kvpress that sees veridraft's torch; the bench starts its
worker with that venv's python ($VERIDRAFT_KVPRESS_PYTHON overrides it). Without the venv the
rows are skipped with the reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import VeridraftError
from .base import Method, RunOutput
from .worker import WorkerMethod

PRESSES = {
    "snapkv": "SnapKVPress",
    "streaming": "StreamingLLMPress",
    "knorm": "KnormPress",
    "pyramidkv": "PyramidKVPress",
    "tova": "TOVAPress",
    "expected": "ExpectedAttentionPress",
    "random": "RandomPress",
}


def kvpress_python() -> Path:
    """The python of kvpress's own venv."""
    env = os.environ.get("VERIDRAFT_KVPRESS_PYTHON")
    if env:
        return Path(env)
    home = Path(os.environ.get("VERIDRAFT_HOME") or Path.home() / ".cache" / "veridraft")
    return home / "peers" / "kvpress" / "bin" / "python"


def parse(spec: str) -> tuple[str, dict[str, float]]:
    """ "kvpress:snapkv:ratio=0.5" -> ("snapkv", {"ratio": 0.5}); "kvpress:ar" -> ("ar", {})."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != "kvpress":
        raise VeridraftError(f"not a kvpress method: {spec!r}")
    kind = parts[1].strip().lower()
    valid = "kvpress:ar or kvpress:PRESS:ratio=R|budget=N, PRESS one of " + ", ".join(PRESSES)
    if kind != "ar" and kind not in PRESSES:
        raise VeridraftError(f"unknown kvpress method {spec!r}; use {valid}")
    params: dict[str, float] = {}
    for piece in (p for p in ":".join(parts[2:]).split(",") if p.strip()):
        key, eq, value = piece.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("ratio", "budget"):
            raise VeridraftError(f"kvpress: expected ratio=R or budget=N, got {piece!r}")
        try:
            params[key] = float(value)
        except ValueError:
            raise VeridraftError(f"kvpress: {key} must be a number, got {value!r}") from None
    if kind == "ar" and params:
        raise VeridraftError("kvpress:ar takes no parameters")
    if kind != "ar" and len(params) != 1:
        raise VeridraftError(f"{spec}: give exactly one of ratio=R (0..1) or budget=N (tokens)")
    if not 0.0 <= params.get("ratio", 0.0) < 1.0:
        raise VeridraftError(f"kvpress: ratio must be in [0, 1), got {params['ratio']}")
    if params.get("budget", 1.0) < 1:
        raise VeridraftError(f"kvpress: budget must be at least 1 token, got {params['budget']}")
    return kind, params


def compression_ratio(params: dict[str, float], prompt_len: int) -> float:
    if "ratio" in params:
        return params["ratio"]
    return max(0.0, 1.0 - params["budget"] / prompt_len)


def make_kvpress_peer(spec: str, model, threads: int = 2) -> Method:
    """The worker-process method for a kvpress spec; skipped, with why, without the venv."""
    parse(spec)  # a bad spec fails here, in the parent
    method = WorkerMethod(
        spec, model, f"{__name__}:local_kvpress", threads=threads, python=str(kvpress_python())
    )
    if not kvpress_python().is_file():
        method.skip_reason = (
            f"kvpress is not installed: run `make setup-kvpress` (kvpress 0.5.5 needs "
            f"transformers < 5.3, so it gets a venv of its own at {kvpress_python().parents[1]})"
        )
    return method


def local_kvpress(spec: str, model, threads: int = 2) -> Method:
    return KVPressMethod(spec, model, threads=threads)


class KVPressMethod(Method):
    """Runs inside the kvpress venv's worker: transformers' generate under a press."""

    engine = "kvpress"

    def __init__(self, spec: str, model, threads: int = 2) -> None:
        super().__init__(spec)
        self.kind, self.params = parse(spec)
        self.model_info = model
        self.threads = threads
        self.baseline = "kvpress:ar"
        self.lossless = self.kind == "ar"
        self.hf = None

    def prepare(self) -> None:
        import torch
        import transformers

        torch.set_num_threads(self.threads)
        path = self.model_info.path
        if not path or not Path(path, "config.json").is_file():
            raise VeridraftError(f"kvpress needs an HF folder of the model, got {path!r}")
        try:
            from ..models.catalog import float32_folder

            hf = transformers.AutoModelForCausalLM.from_pretrained(
                float32_folder(path), dtype=torch.float32
            )
        except Exception as e:
            msg = f"transformers {transformers.__version__} cannot load {path}: {e}"
            raise VeridraftError(msg) from e
        self.hf = hf.eval()
        if self.kind != "ar":
            import kvpress

            self.press_cls = getattr(kvpress, PRESSES[self.kind])

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        import torch

        if temperature:
            raise VeridraftError("the kvpress peer runs greedy decoding only (temperature 0)")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        eos = sorted(self.model_info.eos_ids) or None
        kw = dict(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0] if eos else None,
            attention_mask=torch.ones_like(ids),
        )
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.kind == "ar":
                out = self.hf.generate(ids, **kw)
            else:
                ratio = compression_ratio(self.params, len(prompt_ids))
                press = self.press_cls(compression_ratio=ratio)
                with press(self.hf):
                    out = self.hf.generate(ids, **kw)
        wall = time.perf_counter() - t0
        new = out[0, ids.shape[1] :].tolist()
        reason = "eos" if new and eos and new[-1] in eos else "length"
        return RunOutput(ids=new, wall_s=wall, finish_reason=reason)
