"""Tokenizer: a `tokenizers` tokenizer.json plus a jinja2 chat template, no transformers import.

Loads in well under a second and reproduces `transformers.AutoTokenizer.from_pretrained(folder)`:
the same ids from `encode` (special tokens such as Gemma's `<bos>` included), the same text from
`decode`, and the same chat render as `apply_chat_template(..., tokenize=False)` (a sandboxed jinja2
environment with the same globals and filters). `StreamDecoder` turns ids into text incrementally
for streaming, holding back incomplete UTF-8 sequences.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors

from .errors import VeridraftError

_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise VeridraftError(
            f"{path} is not valid JSON ({e}); re-pull or re-convert the model"
        ) from e


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [int(v) for v in value]
    return [int(value)]


def _clean_up_tokenization(text: str) -> str:  # what transformers does when asked to
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


# ---------------------------------------------------------------------------------------------
# chat templates (same environment as transformers.utils.chat_template_utils)


def _compile_template(source: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        # rendering just passes the body through.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise VeridraftError(
            f"the model's chat template does not parse ({e.message}, line {e.lineno}); "
            "fix chat_template.jinja or pass raw text"
        ) from e


# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Tokenizer of one model folder (tokenizer.json + tokenizer_config.json + chat template)."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        eos_ids: Iterable[int] = (),
        bos_id: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        name: str = "this model",
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.name = name
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        eos = set(eos_ids)
        if (t := self.special_tokens.get("eos_token")) and (
            i := backend.token_to_id(t)
        ) is not None:
            eos.add(i)
        self.eos_ids: set[int] = eos
        if bos_id is None and (t := self.special_tokens.get("bos_token")):
            bos_id = backend.token_to_id(t)
        self.bos_id: int | None = bos_id
        self._compiled = None
        self._cleanup = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path).expanduser()
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise VeridraftError(
                f"{folder} has no tokenizer.json; convert the model with veridraft "
                "(load its GGUF file) or save its tokenizer with transformers' save_pretrained"
            )
        try:
            backend = _HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise VeridraftError(
                f"cannot read {tj} ({' '.join(str(e).split())[:160]}); re-pull or re-convert"
            ) from e
        tcfg = _read_json(folder / "tokenizer_config.json")
        special = {k: s for k in _SPECIAL_KEYS if (s := _token_str(tcfg.get(k))) is not None}

        # transformers rebuilds the post-processor when add_bos/eos_token is configured, or
        # when tokenizer.json has none; do the same so that encode() adds what it adds.
        if "add_bos_token" in tcfg or "add_eos_token" in tcfg or backend.post_processor is None:
            cls._set_post_processor(
                backend,
                special.get("bos_token") if tcfg.get("add_bos_token") else None,
                special.get("eos_token") if tcfg.get("add_eos_token") else None,
            )
        if tcfg.get("split_special_tokens"):
            backend.encode_special_tokens = True

        chat = None
        if (folder / "chat_template.jinja").is_file():
            chat = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            chat = _read_json(folder / "chat_template.json").get("chat_template")
        elif isinstance(tcfg.get("chat_template"), str):
            chat = tcfg["chat_template"]
        elif isinstance(tcfg.get("chat_template"), list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in tcfg["chat_template"]}
            chat = named.get("default")

        cfg = _read_json(folder / "config.json")
        cfg = cfg.get("text_config", cfg) if "eos_token_id" not in cfg else cfg
        gen = _read_json(folder / "generation_config.json")
        eos = set(_as_ids(cfg.get("eos_token_id"))) | set(_as_ids(gen.get("eos_token_id")))
        bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        if bos is None and cfg.get("bos_token_id") is not None:
            bos = int(cfg["bos_token_id"])
        return cls(
            backend,
            special_tokens=special,
            chat_template=chat,
            eos_ids=eos,
            bos_id=bos,
            clean_up_tokenization_spaces=bool(tcfg.get("clean_up_tokenization_spaces", False)),
            name=folder.name,
        )

    @staticmethod
    def _set_post_processor(backend: _HFTokenizer, bos: str | None, eos: str | None) -> None:
        single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
        special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    # -- ids <-> text -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._cleanup else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (added tokens included). The model's
        embedding may be larger (padded); it is never smaller for a consistent checkpoint."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_to_id(self, s: str) -> int | None:
        return self.backend.token_to_id(s)

    @property
    def all_special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    # -- chat -------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render messages like transformers' apply_chat_template(..., tokenize=False)."""
        if not self.chat_template:
            raise VeridraftError(
                f"{self.name} has no chat template (a base model): give it raw text to continue "
                "instead of chat messages"
            )
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        for m in messages:
            if not isinstance(m, dict):
                raise VeridraftError(
                    f"chat messages must be dicts like {{'role': 'user', 'content': '...'}}, "
                    f"got {type(m).__name__}"
                )
        # transformers drops None-valued keys (OpenAI-style content=None) before rendering
        msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {**self.special_tokens, **kwargs}
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        import jinja2

        try:
            return self._compiled.render(
                messages=msgs, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:
            raise VeridraftError(
                f"the chat template of {self.name} refused the messages: {e}"
            ) from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render the chat, then encode without adding special tokens (as transformers does)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab={self.vocab_size}, bos={self.bos_id}, "
            f"eos={sorted(self.eos_ids)}, chat_template={self.has_chat_template})"
        )


class StreamDecoder:
    """Incremental detokenization: `push(ids)` returns the new text since the last call.

    Decodes a short window (the ids of the previous piece plus the new ones) rather than the whole
    sequence, and subtracts the previous piece's text, which keeps decoders that strip a leading
    space correct. Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until a later
    id completes it. `flush()` returns whatever is still held. The concatenation of all pieces
    equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: int | Iterable[int]) -> str:
        if isinstance(ids, int):
            self.ids.append(ids)
        else:
            self.ids.extend(int(i) for i in ids)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Emit the held-back tail (with replacement characters if it never completed)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :]
