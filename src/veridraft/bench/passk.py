"""pass@1: run a problem's unit tests on generated code, isolated, with a time limit.

Generated code is untrusted. Each program runs in its own `python -I` process (isolated mode: no
user site, no PYTHON* variables, no script dir on sys.path), in a fresh temporary working
directory that is removed afterwards, with an environment that carries no proxy settings, in a
new session so that a timeout kills everything it started. Inside, before the program runs, a
guard blocks sockets (connect, bind, DNS lookups) and sets resource limits (CPU seconds, address
space, file size, no core dumps). This keeps honest mistakes (an endless loop, a huge
allocation, a stray network call) from hurting the benchmark; it is not a security sandbox for
hostile code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .humaneval import Problem, extract_code

DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 << 30

# Runs in the child before the program: argv = [guard, program file, cpu seconds, memory bytes].
_GUARD = r"""
import resource, runpy, socket, sys
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while running tests")
for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    setattr(socket.socket, _name, _no_network)
socket.create_connection = socket.getaddrinfo = socket.gethostbyname = _no_network
_cpu, _mem = int(sys.argv[2]), int(sys.argv[3])
for _what, _limit in ((resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_AS, _mem),
                      (resource.RLIMIT_FSIZE, 1 << 24), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(_what, (_limit, _limit))
    except (ValueError, OSError):
        pass
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class TestResult:
    passed: bool
    status: str  # "passed", "failed" (assertion or error), "timeout"
    detail: str  # last line of stderr, or the time limit
    seconds: float


def _clean_env() -> dict[str, str]:
    """A minimal environment: no proxies, no PYTHON* variables, no credentials of the parent."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    env["no_proxy"] = env["NO_PROXY"] = "*"
    return env


def run_program(source: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TestResult:
    """Run `source` as a script in an isolated child process; passed = exit status 0."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="veridraft-passk-") as tmp:
        prog = Path(tmp) / "candidate.py"
        prog.write_text(source, encoding="utf-8")
        cpu = max(1, int(timeout_s) + 1)
        cmd = [sys.executable, "-I", "-c", _GUARD, str(prog), str(cpu), str(MEMORY_LIMIT_BYTES)]
        proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: the kill reaches its children
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return TestResult(False, "timeout", f"killed after {timeout_s:g} s", timeout_s)
        finally:
            _kill_group(proc)  # children it left behind
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return TestResult(True, "passed", "", seconds)
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    detail = lines[-1][:200] if lines else f"exit status {proc.returncode}"
    return TestResult(False, "failed", detail, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def program_for(problem: Problem, answer: str) -> str:
    """The test program of an answer: the problem's prompt (its imports and helpers), the answer's
    code (a whole function redefines the prompt's stub; a bare body continues the prompt), the
    tests, and the call of check()."""
    code = extract_code(answer, problem.entry_point)
    defines = f"def {problem.entry_point}(" in code
    body = f"{problem.prompt}\n{code}" if defines else problem.prompt + code
    return f"{body}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def check_answer(problem: Problem, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TestResult:
    """Run the problem's unit tests on the code of `answer` (a model's reply)."""
    return run_program(program_for(problem, answer), timeout_s)


def score_records(
    records: list[dict], problems: dict[str, Problem], timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Add `passed` and `test_status` to every record of a HumanEval question (in place).

    Equal answers are tested once: lossless methods repeat plain decoding's text."""
    seen: dict[tuple[str, str], TestResult] = {}
    for rec in records:
        p = problems.get(str(rec.get("question_id")))
        if p is None or rec.get("error") or "text" not in rec:
            continue
        key = (p.task_id, rec["text"])
        if key not in seen:
            seen[key] = check_answer(p, rec["text"], timeout_s)
        res = seen[key]
        rec["passed"] = res.passed
        rec["test_status"] = res.status if res.passed else f"{res.status}: {res.detail}"


def pass_at_1(records: list[dict], method: str) -> float | None:
    """Fraction of a method's scored answers that pass (one sample per problem: pass@1)."""
    scored = [r["passed"] for r in records if r["method"] == method and "passed" in r]
    return sum(scored) / len(scored) if scored else None
