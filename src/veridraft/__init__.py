"""veridraft: faster LLM generation without changing what the model would have said."""

from .errors import VeridraftError
from .generate import Generation, generate
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
    "load",
]
__version__ = "0.1.0"
