"""Peak memory of the process around one generation (Linux VmHWM, reset before each run).

Kept free of torch: the peer worker process imports it too, and must measure only itself."""

from __future__ import annotations

import re

import psutil


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(reset_ok: bool) -> float:
    """Peak RSS since the last reset (Linux VmHWM), else the current RSS (psutil), in MB."""
    if reset_ok:
        try:
            with open("/proc/self/status") as f:
                m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            if m:
                return int(m.group(1)) / 1024
        except OSError:
            pass
    return psutil.Process().memory_info().rss / 2**20
