"""veridraft: faster LLM generation without changing what the model would have said."""

from .errors import VeridraftError
from .generate import Generation, generate, generate_ids
from .loader import LoadedModel, load
from .sampling import SamplingParams
from .stats import Stats

__all__ = [
    "Generation",
    "LoadedModel",
    "SamplingParams",
    "Stats",
    "VeridraftError",
    "generate",
    "generate_ids",
    "load",
]
__version__ = "0.1.0"
