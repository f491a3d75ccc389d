"""A veridraft method expected to lose on this machine runs as asked, but the benchmark says so
on stderr and lists it in the report."""

from veridraft.bench.methods import VeridraftMethod
from veridraft.bench.metrics import OVERALL
from veridraft.bench.report import _methods_table
from veridraft.draft import Draft
from veridraft.drafters import DRAFTERS


class Slowpoke:
    name = "slowpoke"
    takes_arg = False
    params = ()
    aliases: dict = {}
    expected_slowdown = "slowpoke: its profile measured x0.60 against plain decoding"

    @classmethod
    def from_spec(cls, model, arg, params, env=None):
        return cls()

    def prefill(self, ctx):
        pass

    def propose(self, ctx, max_tokens):
        return Draft(tokens=[])

    def update(self, rnd):
        pass


def test_a_method_expected_to_lose_is_reported(capsys):
    DRAFTERS["slowpoke"] = Slowpoke
    try:
        m = VeridraftMethod("slowpoke", None)
        m.prepare()
    finally:
        del DRAFTERS["slowpoke"]
    err = capsys.readouterr().err
    # the reason names its drafter; the warning line says so once
    assert "bench: warning: slowpoke: its profile measured x0.60" in err
    assert "slowpoke: slowpoke" not in err
    info = m.info()
    assert info["warning"] == Slowpoke.expected_slowdown
    results = {
        "summary": {"table": {OVERALL: {"slowpoke": {}, "ar": {}}}, "reference": "ar"},
        "methods": {"ar": VeridraftMethod("ar", None).info(), "slowpoke": info},
    }
    rows = "\n".join(_methods_table(results))
    assert "Expected to be slower than plain decoding" in rows
    assert "- `slowpoke`: slowpoke: its profile measured x0.60" in rows
    assert "- `ar`" not in rows
