"""The head benchmark's long-context comparison: full attention against a window, per context."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from drafting_helpers import small_head_config

from veridraft.bench import eagle_head
from veridraft.drafters.eagle import EagleHead, save_head

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_windows_reports_a_bounded_cache(tmp_path, capsys):
    c = small_head_config()
    torch.manual_seed(0)
    save_head(EagleHead(c), tmp_path / "heads" / "eagle-tiny")
    args = argparse.Namespace(head=None, window=16, contexts="40,400", repeats=2, threads="1")
    assert eagle_head.compare_windows(tmp_path, args) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"context +(\d+) (\S+) .*cache rows (\d+) / (\d+)", out)
    assert len(rows) == 4, out
    for context, _, full, window in rows:
        assert int(full) > int(context)  # full attention keeps a row per position
        if int(context) > 4 + 2 * 16 + 256:
            assert int(window) < int(context)  # the window keeps sink + 2W + a call's rows
