"""What every benchmarked method is: its result type and base class (no heavy imports, so the
CLI can build its help from here without loading torch)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

DEFAULT_METHODS = "ar,ngram,layerskip,hf:ar,hf:pld"
# Method names of the peers: `hf:...` (transformers), `llamacpp:...` (llama-cpp-python) and
# `kvpress:...` (KV-cache compression, lossy; in a venv of its own).
PEER_ENGINES = ("hf", "llamacpp", "kvpress")


@dataclass
class RunOutput:
    """What one generation call returns to the harness."""

    ids: list[int]
    wall_s: float  # the timed region: the generation call, prefill + decode
    prefill_s: float | None = None  # prefill + first token (time to first token for peers)
    stats: dict | None = None  # veridraft Stats.to_dict(); None for peers
    steps: int | None = None  # peers: generation steps seen (target forwards incl. prefill)
    finish_reason: str | None = None
    peak_rss_mb: float | None = None  # set by methods that run in another process


class Method(ABC):
    """One benchmarked method. Subclasses implement `run` (and `prepare` to load things once)."""

    engine = "veridraft"

    def __init__(self, name: str) -> None:
        self.name = name
        self.baseline = "ar"  # the plain decoding this method's speedup is measured against
        self.lossless = True
        self.skip_reason: str | None = None

    def prepare(self) -> None:  # noqa: B027 (an optional hook: by default nothing to load)
        """Load what the method needs (outside any timing); set skip_reason to skip it."""

    @abstractmethod
    def run(
        self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int
    ) -> RunOutput:
        """One timed generation of `prompt_ids`."""

    def close(self) -> None:  # noqa: B027 (an optional hook: by default nothing to release)
        """Release what `prepare` loaded (a worker process, say); called once at the end."""

    def info(self) -> dict:
        return {
            "engine": self.engine,
            "baseline": self.baseline,
            "lossless": self.lossless,
            "skipped": self.skip_reason,
        }
