"""The report's load note: only load beyond the run's own threads means competition."""

from __future__ import annotations

from veridraft.bench.report import _load_warning


def _records(*loads: float) -> list[dict]:
    return [{"load_1min": x} for x in loads]


def test_a_run_alone_on_its_cores_gets_no_note():
    # a 2-thread run alone on 2 CPUs: the load average reads about 2
    assert _load_warning({"cpu_count": 2}, {"threads": 2}, _records(1.7, 2.0, 2.3)) == []


def test_load_beyond_the_runs_threads_is_reported():
    note = _load_warning({"cpu_count": 2}, {"threads": 2}, _records(2.0, 4.5))
    assert note and "up to 4.5" in note[0] and "own 2 thread(s)" in note[0]


def test_a_one_thread_run_counts_one():
    env = {"cpu_count": 2}
    assert _load_warning(env, {"threads": 1}, _records(1.2)) == []
    assert _load_warning(env, {"threads": 1}, _records(1.8))  # another process took a core


def test_threads_beyond_the_cpus_count_as_the_cpus():
    assert _load_warning({"cpu_count": 2}, {"threads": 8}, _records(4.0))
