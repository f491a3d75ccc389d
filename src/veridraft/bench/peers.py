"""Peer comparators: transformers in the benchmark process, llama.cpp in a worker process.

- `hf:ar`     transformers `generate(do_sample=False)` on the same HF folder, float32
- `hf:pld`    transformers prompt lookup (`prompt_lookup_num_tokens=10`)
- `hf:assisted:DRAFT`  transformers assisted generation with DRAFT (a catalog name or an HF
              folder) as `assistant_model`; when its tokenizer differs, HF's universal assisted
              generation (`tokenizer=` + `assistant_tokenizer=`)
- `llamacpp:ar`, `llamacpp:pld`  llama-cpp-python on the original GGUF (`source.gguf`), plain and
              `LlamaPromptLookupDecoding(num_pred_tokens=10)`; an optional extra, skipped with a
              message when `llama_cpp` is not installed

Every peer gets veridraft's prompt ids and returns generated ids; the harness times the call.
llama.cpp runs in a worker process of its own (bench.worker): a native crash there is reported
as that method's failure and the run goes on. transformers stays in the benchmark's process,
where hf:ar, hf:pld and hf:assisted share one loaded model.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import VeridraftError
from .base import Method, RunOutput
from .worker import WorkerMethod

HF_PLD_TOKENS = 10
LLAMACPP_PLD_TOKENS = 10

_HF_CACHE: dict[str, object] = {}  # folder -> loaded transformers model (shared by hf:* methods)
_TOK_CACHE: dict[str, object] = {}


def make_peer(spec: str, model, threads: int = 2) -> Method:
    """The method for a peer spec; llama.cpp ones run in a worker process."""
    if spec.startswith("kvpress:"):
        from .kvpress_peer import make_kvpress_peer

        return make_kvpress_peer(spec, model, threads=threads)
    method = local_peer(spec, model, threads=threads)  # checks the spec here, in the parent
    if method.engine == "llamacpp":
        return WorkerMethod(spec, model, f"{__name__}:local_peer", threads=threads)
    return method


def local_peer(spec: str, model, threads: int = 2) -> Method:
    """The peer method for `spec`, run in the calling process."""
    engine, _, rest = spec.partition(":")
    if engine == "hf":
        if rest in ("ar", "pld"):
            return HFMethod(spec, model, rest)
        if rest.startswith("assisted:") and rest[len("assisted:") :]:
            return HFMethod(spec, model, "assisted", draft=rest[len("assisted:") :])
        raise VeridraftError(
            f"unknown transformers method {spec!r}; use hf:ar, hf:pld or hf:assisted:DRAFT"
        )
    if engine == "llamacpp":
        if rest in ("ar", "pld"):
            return LlamaCppMethod(spec, model, rest, threads=threads)
        raise VeridraftError(f"unknown llama.cpp method {spec!r}; use llamacpp:ar or llamacpp:pld")
    raise VeridraftError(f"unknown peer method {spec!r}")


def _hf_model(folder: str):
    if folder not in _HF_CACHE:
        import torch
        from transformers import AutoModelForCausalLM

        try:
            from ..models.catalog import float32_folder

            m = AutoModelForCausalLM.from_pretrained(float32_folder(folder), dtype=torch.float32)
        except Exception as e:
            raise VeridraftError(f"transformers cannot load {folder}: {e}") from e
        _HF_CACHE[folder] = m.eval()
    return _HF_CACHE[folder]


def _hf_tokenizer(folder: str):
    if folder not in _TOK_CACHE:
        from transformers import AutoTokenizer

        _TOK_CACHE[folder] = AutoTokenizer.from_pretrained(folder)
    return _TOK_CACHE[folder]


class _StepTimer:
    """A transformers streamer that counts generation steps and times the first one."""

    def __init__(self) -> None:
        self.calls = 0
        self.t_first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call is the prompt
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass

    @property
    def steps(self) -> int:
        return max(0, self.calls - 1)


class HFMethod(Method):
    engine = "hf"

    def __init__(self, spec: str, model, kind: str, draft: str | None = None) -> None:
        super().__init__(spec)
        self.model = model
        self.kind = kind
        self.draft = draft
        self.baseline = "hf:ar"
        self.folder = str(getattr(model, "path", "") or "")
        self.hf = None
        self.assistant = None
        self.universal = False

    def prepare(self) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError:
            self.skip_reason = "transformers is not installed"
            return
        if not self.folder or not (Path(self.folder) / "config.json").is_file():
            raise VeridraftError(
                f"{self.name}: the model has no HF folder with config.json ({self.folder!r})"
            )
        self.hf = _hf_model(self.folder)
        if self.kind == "assisted":
            dfolder = self._draft_folder()
            self.assistant = _hf_model(dfolder)
            t_vocab = _hf_tokenizer(self.folder).get_vocab()
            d_vocab = _hf_tokenizer(dfolder).get_vocab()
            self.universal = t_vocab != d_vocab
            self.tokenizers = (_hf_tokenizer(self.folder), _hf_tokenizer(dfolder))

    def _draft_folder(self) -> str:
        p = Path(self.draft).expanduser()
        if (p / "config.json").is_file():
            return str(p)
        from ..models import catalog

        if self.draft in catalog.CATALOG:
            return str(catalog.pull(self.draft))
        import veridraft

        return str(veridraft.load(self.draft, precision="fp32").path)

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        import torch
        from transformers import GenerationConfig

        eos = sorted(self.model.tokenizer.eos_ids)
        greedy = temperature <= 0
        kw = dict(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            num_beams=1,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else None,
        )
        if not greedy:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        if self.kind == "pld":
            kw["prompt_lookup_num_tokens"] = HF_PLD_TOKENS
        gc = GenerationConfig(**kw)
        extra = {}
        if self.kind == "assisted":
            extra["assistant_model"] = self.assistant
            if self.universal:
                extra["tokenizer"], extra["assistant_tokenizer"] = self.tokenizers
        x = torch.tensor([list(prompt_ids)], dtype=torch.long)
        timer = _StepTimer()
        torch.manual_seed(seed)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.hf.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                generation_config=gc,
                streamer=timer,
                **extra,
            )
            wall = time.perf_counter() - t0
        new = out[0, x.shape[1] :].tolist()
        eos_set = set(eos)
        reason = "eos" if new and new[-1] in eos_set else "length"
        return RunOutput(
            ids=new,
            wall_s=wall,
            prefill_s=None if timer.t_first is None else timer.t_first - t0,
            stats=None,
            steps=timer.steps or None,
            finish_reason=reason,
        )


class LlamaCppMethod(Method):
    engine = "llamacpp"

    def __init__(self, spec: str, model, kind: str, threads: int = 2) -> None:
        super().__init__(spec)
        self.model = model
        self.kind = kind
        self.threads = threads
        self.baseline = "llamacpp:ar"
        self.llm = None

    def prepare(self) -> None:
        try:
            import llama_cpp
        except ImportError:
            self.skip_reason = (
                "llama-cpp-python is not installed (make setup-llamacpp builds it, ~10+ minutes)"
            )
            return
        gguf = getattr(self.model, "gguf_path", None)
        if gguf is None:
            p = Path(str(getattr(self.model, "path", ""))) / "source.gguf"
            gguf = p if p.is_file() else None
        if gguf is None:
            self.skip_reason = f"{self.model.name} has no original GGUF file for llama.cpp"
            return
        draft = None
        if self.kind == "pld":
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=LLAMACPP_PLD_TOKENS)
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=int(getattr(self.model, "context_length", 4096) or 4096),
            n_threads=self.threads,
            n_threads_batch=self.threads,
            draft_model=draft,
            # With a draft model llama-cpp-python keeps the logits of every position, but sizes
            # that buffer from this argument: left False, prompts past n_batch (512) tokens fail
            # with "could not broadcast input array". Pages are touched only as they are used.
            logits_all=draft is not None,
            verbose=False,
        )
        # llama.cpp's Q4 GGUF is not veridraft's float32: exact match vs ar is informative only.

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        llm = self.llm
        eos = set(self.model.tokenizer.eos_ids) | {llm.token_eos()}
        llm.reset()
        llm.set_seed(seed)
        new: list[int] = []
        t_first = None
        t0 = time.perf_counter()
        for tok in llm.generate(
            list(prompt_ids),
            top_k=1 if temperature <= 0 else 0,
            top_p=1.0,
            min_p=0.0,
            temp=max(temperature, 0.0),
            repeat_penalty=1.0,
            reset=True,
        ):
            if t_first is None:
                t_first = time.perf_counter()
            new.append(int(tok))
            if tok in eos or len(new) >= max_new_tokens:
                break
        wall = time.perf_counter() - t0
        return RunOutput(
            ids=new,
            wall_s=wall,
            prefill_s=None if t_first is None else t_first - t0,
            stats=None,
            steps=None,
            finish_reason="eos" if new and new[-1] in eos else "length",
        )
