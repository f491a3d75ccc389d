"""A real `veridraft serve` process on 127.0.0.1 for the end-to-end tests, and raw HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`veridraft serve ARGS` in a subprocess; started by `start()`, waits for /health."""

    def __init__(self, *args: str, timeout: float = 180.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        # The server must run this checkout's code, whatever is installed in the environment.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="veridraft-serve-", suffix=".log")
        cmd = [
            sys.executable,
            "-c",
            "import sys; from veridraft.cli import main; sys.exit(main())",
            "serve",
            "--port",
            str(self.port),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not answer /health in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text, lower-cased headers) without raising on HTTP errors."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, data, hdrs = r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        status, data, hdrs = e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}
    try:
        return status, json.loads(data), hdrs
    except ValueError:
        return status, data.decode(), hdrs


def get(url: str, headers: dict | None = None):
    return request("GET", url, None, headers)


def post_json(url: str, body, headers: dict | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request("POST", url, raw, {"Content-Type": "application/json", **(headers or {})})


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text, _ = get(url + "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
