"""The benchmark's public names in one place, for code written against this module.

The benchmark lives in: `base` (the method interface), `methods` (veridraft's methods and the
`--methods` list), `peers` (transformers and llama.cpp), `protocol` (the interleaved run loop),
`metrics` (summaries), `environment` (machine and versions), `report` (files), `run`
(`run_bench`) and `cli` (`veridraft bench`).
"""

from .base import DEFAULT_METHODS, Method, RunOutput
from .cli import add_bench_arguments, add_bench_parser, main, run_bench_cli
from .environment import THREAD_ENV_VARS, command_line, cpu_name, environment
from .methods import VeridraftMethod, make_method, split_methods
from .metrics import (
    METRIC_KEYS,
    acceptance_per_pos_of,
    alpha_of,
    basic_metrics,
    exact_match,
    per_question_rates,
    summarize,
    tau_of,
)
from .protocol import Protocol, rotated, run_protocol
from .run import BenchConfig, default_out_dir, run_bench

__all__ = [
    "DEFAULT_METHODS",
    "METRIC_KEYS",
    "THREAD_ENV_VARS",
    "Method",
    "Protocol",
    "RunOutput",
    "VeridraftMethod",
    "acceptance_per_pos_of",
    "add_bench_arguments",
    "add_bench_parser",
    "alpha_of",
    "basic_metrics",
    "command_line",
    "cpu_name",
    "default_out_dir",
    "environment",
    "exact_match",
    "main",
    "make_method",
    "per_question_rates",
    "rotated",
    "BenchConfig",
    "run_bench",
    "run_bench_cli",
    "run_protocol",
    "split_methods",
    "summarize",
    "tau_of",
]
