"""BenchConfig: what `veridraft bench` builds from its arguments, and its checks."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from veridraft.bench.cli import add_bench_parser, bench_config
from veridraft.bench.run import BenchConfig, run_bench
from veridraft.errors import VeridraftError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="veridraft")
    add_bench_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(["bench", *argv])


def test_cli_defaults_are_the_library_defaults():
    cfg = bench_config(_args())
    assert cfg.out.parent == Path("out") and cfg.out.name.startswith("bench-smollm2-135m-")
    got = dataclasses.asdict(cfg)
    want = dataclasses.asdict(BenchConfig())
    for key in ("out", "questions"):  # out: a fresh directory; questions: found at run time
        got.pop(key), want.pop(key)
    assert got == want


def test_cli_arguments_reach_the_config():
    cfg = bench_config(
        _args(
            "--groups", " qa, ,rag ", "--no-progress", "--out", "x", "--suite", "long",
            "--context", "2k,4k", "--threads", "3", "--limit", "2", "--precision", "bf16",
        )
    )  # fmt: skip
    assert cfg.groups == ["qa", "rag"] and cfg.progress is False and cfg.out == Path("x")
    assert (cfg.suite, cfg.context, cfg.threads, cfg.limit) == ("long", "2k,4k", 3, 2)
    assert cfg.precision == "bf16" and cfg.bandwidth is True and cfg.command is None


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("repeats", 0, "--repeats"),
        ("warmup", -1, "--warmup"),
        ("max_new_tokens", 0, "--max-new-tokens"),
        ("threads", 0, "--threads"),
        ("suite", "nosuch", "--suite"),
    ],
)
def test_bad_settings_fail_before_loading_anything(field, value, flag):
    # the model does not exist: a check that came after loading would fail on it instead
    with pytest.raises(VeridraftError, match=flag):
        run_bench("no-such-model", BenchConfig(**{field: value}), log=lambda s: None)
