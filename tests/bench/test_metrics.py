"""Metric formulas on hand-made records, method-list parsing, and the interleaving protocol."""

import pytest

from veridraft.bench.base import Method, RunOutput
from veridraft.bench.environment import command_line
from veridraft.bench.methods import split_methods
from veridraft.bench.metrics import (
    acceptance_per_pos_of,
    alpha_of,
    basic_metrics,
    exact_match,
    summarize,
    tau_of,
)
from veridraft.bench.protocol import Protocol, rotated, run_protocol
from veridraft.bench.questions import Question
from veridraft.errors import VeridraftError


def rec(
    method,
    qid,
    tokens,
    secs,
    *,
    turn=0,
    group="qa",
    repeat=0,
    stats=None,
    ids=None,
    steps=None,
    prefill=None,
):
    return {
        "method": method,
        "question_id": qid,
        "category": group,
        "group": group,
        "turn": turn,
        "repeat": repeat,
        "new_tokens": tokens,
        "wall_s": secs,
        "stats": stats,
        "ids": ids if ids is not None else list(range(tokens)),
        "steps": steps,
        "prefill_s": prefill,
        "decode_s": None if prefill is None else secs - prefill,
        "prompt_tokens": 10,
    }


def stats(forwards, emitted, drafted=0, accepted=0, dpp=(), app=()):
    return {
        "target_forwards": forwards,
        "emitted_in_rounds": emitted,
        "drafted": drafted,
        "accepted": accepted,
        "drafted_per_pos": list(dpp),
        "accepted_per_pos": list(app),
    }


def test_tau_counts_the_bonus_token():
    # plain decoding: every forward commits exactly its bonus token -> 1.00
    assert tau_of([rec("ar", 1, 5, 1.0, stats=stats(5, 5))]) == 1.0
    # 3 rounds accepting 2, 0, 3 drafts: committed 3 + 1 + 4 = 8 tokens over 3 forwards
    r = rec("ngram", 1, 8, 1.0, stats=stats(3, 8, drafted=12, accepted=5))
    assert tau_of([r]) == pytest.approx(8 / 3)
    # pooled over records (per round, not a mean of per-record taus)
    r2 = rec("ngram", 2, 1, 1.0, stats=stats(1, 1, drafted=4, accepted=0))
    assert tau_of([r, r2]) == pytest.approx(9 / 4)
    # peers: generated ids per generation step seen
    assert tau_of([rec("hf:pld", 1, 30, 1.0, steps=12)]) == pytest.approx(2.5)
    assert tau_of([rec("hf:pld", 1, 30, 1.0)]) is None


def test_alpha_and_per_position_acceptance_are_pooled():
    a = rec("ngram", 1, 8, 1.0, stats=stats(3, 8, 6, 3, dpp=[3, 3], app=[2, 1]))
    b = rec("ngram", 2, 8, 1.0, stats=stats(3, 8, 3, 3, dpp=[1, 1, 1], app=[1, 1, 1]))
    assert alpha_of([a, b]) == pytest.approx(6 / 9)
    assert acceptance_per_pos_of([a, b]) == pytest.approx([3 / 4, 2 / 4, 1.0])
    assert alpha_of([rec("ar", 1, 5, 1.0, stats=stats(5, 5))]) is None
    assert alpha_of([rec("hf:ar", 1, 5, 1.0)]) is None


def test_mean_of_rates_differs_from_total_over_total():
    recs = [rec("ar", 1, 100, 1.0), rec("ar", 2, 100, 10.0)]
    m = basic_metrics(recs)
    assert m["tok_s_mean"] == pytest.approx((100 + 10) / 2)  # Spec-Bench: 55
    assert m["tok_s_total"] == pytest.approx(200 / 11)  # 18.2
    assert m["questions"] == 2 and m["new_tokens"] == 200


def test_per_question_rate_sums_turns():
    recs = [rec("ar", 1, 30, 1.0, turn=0), rec("ar", 1, 10, 3.0, turn=1), rec("ar", 2, 10, 1.0)]
    m = basic_metrics(recs)
    assert m["tok_s_mean"] == pytest.approx((40 / 4 + 10 / 1) / 2)
    assert m["questions"] == 2 and m["generations"] == 3


def test_exact_match_and_first_mismatch():
    ref = [
        rec("ar", 1, 3, 1, ids=[1, 2, 3]),
        rec("ar", 2, 3, 1, ids=[4, 5, 6]),
        rec("ar", 2, 2, 1, ids=[7, 8], turn=1),
    ]
    same = [
        rec("x", 1, 3, 1, ids=[1, 2, 3]),
        rec("x", 2, 3, 1, ids=[4, 5, 6]),
        rec("x", 2, 2, 1, ids=[7, 9], turn=1),
    ]
    e = exact_match(same, ref)
    assert (e["exact_matched"], e["exact_compared"]) == (1, 2)
    assert e["first_mismatch"]["question_id"] == 2
    assert e["first_mismatch"]["turn"] == 1 and e["first_mismatch"]["token_index"] == 1
    # a prefix (shorter output) mismatches at its end
    e = exact_match([rec("x", 1, 2, 1, ids=[1, 2])], ref)
    assert e["exact_match"] == 0 and e["first_mismatch"]["token_index"] == 2


def test_summarize_speedups_against_own_baseline_and_ar():
    recs = []
    for q, g in ((1, "qa"), (2, "rag")):
        recs.append(rec("ar", q, 20, 1.0, group=g, stats=stats(20, 20)))
        recs.append(rec("ngram", q, 20, 0.5, group=g, stats=stats(10, 20, 20, 10)))
        recs.append(rec("hf:ar", q, 20, 2.0, group=g, steps=20))
        recs.append(rec("hf:pld", q, 20, 1.0, group=g, steps=10))
    info = {
        "ar": {"engine": "veridraft", "baseline": "ar", "lossless": True, "skipped": None},
        "ngram": {"engine": "veridraft", "baseline": "ar", "lossless": True, "skipped": None},
        "hf:ar": {"engine": "hf", "baseline": "hf:ar", "lossless": True, "skipped": None},
        "hf:pld": {"engine": "hf", "baseline": "hf:ar", "lossless": True, "skipped": None},
        "llamacpp:ar": {
            "engine": "llamacpp",
            "baseline": "llamacpp:ar",
            "lossless": True,
            "skipped": "not installed",
        },
    }
    s = summarize(recs, info)
    assert s["groups"] == ["qa", "rag", "overall"]
    t = s["table"]["overall"]
    assert t["ar"]["speedup"] == 1.0 and t["ar"]["exact_match"] is None
    assert t["ngram"]["speedup"] == pytest.approx(2.0) and t["ngram"]["tau"] == 2.0
    assert t["ngram"]["alpha"] == 0.5 and t["ngram"]["exact_match"] == 1.0
    assert t["hf:ar"]["speedup"] == 1.0 and t["hf:ar"]["vs_ar"] == pytest.approx(0.5)
    assert t["hf:pld"]["speedup"] == pytest.approx(2.0) and t["hf:pld"]["vs_ar"] == 1.0
    assert t["hf:pld"]["tau"] == 2.0
    assert t["llamacpp:ar"] == {"skipped": "not installed"}
    assert s["table"]["qa"]["ngram"]["questions"] == 1


def test_repeats_give_mean_and_std():
    recs = [rec("ar", 1, 10, 1.0, repeat=0), rec("ar", 1, 10, 0.5, repeat=1)]
    info = {"ar": {"engine": "veridraft", "baseline": "ar", "lossless": True}}
    t = summarize(recs, info)["table"]["overall"]["ar"]
    assert t["tok_s_mean"] == pytest.approx(15.0)
    assert t["tok_s_mean_std"] == pytest.approx(7.0710678)
    assert t["speedup"] == 1.0 and t["speedup_std"] == 0.0


def test_errors_are_counted_and_left_out():
    recs = [rec("ar", 1, 10, 1.0), {**rec("ar", 2, 0, 0.0), "error": "boom"}]
    info = {"ar": {"engine": "veridraft", "baseline": "ar", "lossless": True}}
    t = summarize(recs, info)["table"]["overall"]["ar"]
    assert t["errors"] == 1 and t["questions"] == 1 and t["tok_s_mean"] == 10.0


def test_split_methods_keeps_parameters_together():
    assert split_methods("ar,ngram,layerskip,hf:ar,hf:pld") == [
        "ar",
        "ngram",
        "layerskip",
        "hf:ar",
        "hf:pld",
    ]
    assert split_methods("ar,ngram:num_tokens=8,max_ngram=3,layerskip:attn=1-3,5,hf:ar") == [
        "ar",
        "ngram:num_tokens=8,max_ngram=3",
        "layerskip:attn=1-3,5",
        "hf:ar",
    ]
    assert split_methods(["ar", "model:smollm2-135m-l8", "hf:assisted:x"]) == [
        "ar",
        "model:smollm2-135m-l8",
        "hf:assisted:x",
    ]
    with pytest.raises(VeridraftError, match="twice"):
        split_methods("ar,ar")
    with pytest.raises(VeridraftError, match="empty"):
        split_methods(" , ")


def test_command_line_is_what_a_user_types(monkeypatch):
    for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    assert command_line(["/x/.venv/bin/veridraft", "bench", "--limit", "2"]) == (
        "veridraft bench --limit 2"
    )
    assert command_line(["/x/src/veridraft/bench/__main__.py", "--methods", "a b"]) == (
        "python -m veridraft.bench --methods 'a b'"
    )
    assert command_line(["/x/src/veridraft/__main__.py", "bench", "--limit", "1"]) == (
        "python -m veridraft bench --limit 1"
    )
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert command_line(["veridraft", "bench"]) == "OMP_WAIT_POLICY=PASSIVE veridraft bench"


def test_rotated():
    assert rotated("abc", 0) == list("abc")
    assert rotated("abc", 4) == list("bca")


# ---- interleaving ---------------------------------------------------------------------------


class Fake(Method):
    def __init__(self, name, log, skip=None):
        super().__init__(name)
        self.log = log
        self.skip = skip

    def prepare(self):
        self.skip_reason = self.skip

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed):
        self.log.append((self.name, tuple(prompt_ids)))
        return RunOutput(ids=[len(self.name), prompt_ids[0]], wall_s=0.01, prefill_s=0.001)


def test_methods_run_back_to_back_and_rotate_per_question_and_repeat():
    log = []
    prompts = []  # encode() appends the messages and returns their index as the single id

    def encode(messages):
        prompts.append([dict(m) for m in messages])
        return [len(prompts) - 1]

    qs = [
        Question(1, "writing", ["t1", "t2"]),
        Question(2, "qa", ["only"]),
        Question(3, "rag", ["r"]),
    ]
    methods = [Fake("a", log), Fake("bb", log), Fake("ccc", log), Fake("skip", log, "absent")]
    msgs = []
    recs = run_protocol(
        qs,
        methods,
        encode,
        lambda ids: f"ans{ids}",
        Protocol(repeats=2, warmup=1, progress=False, log=msgs.append),
    )
    assert msgs[0] == "skipping method skip: absent" and msgs[1].startswith("warm-up: 1 run")
    # warm-up first: every active method once on the first question's first turn
    assert [n for n, _ in log[:3]] == ["a", "bb", "ccc"]
    timed = log[3:]
    assert all(n != "skip" for n, _ in timed)
    assert len(recs) == len(timed) == 2 * (2 + 1 + 1) * 3
    # the method order per (repeat, question): contiguous blocks, rotated by one each time
    blocks = []
    for r in range(2):
        for q in qs:
            rs = [x for x in recs if x["repeat"] == r and x["question_id"] == q.question_id]
            order = []
            for x in rs:
                if not order or order[-1] != x["method"]:
                    order.append(x["method"])
            assert len(order) == 3, "each method's turns run back to back"
            blocks.append(order)
    assert blocks[0] == ["a", "bb", "ccc"]
    assert blocks[1] == ["bb", "ccc", "a"]
    assert blocks[2] == ["ccc", "a", "bb"]
    assert blocks[3] == ["bb", "ccc", "a"]  # repeat 2 starts one further
    assert {b[0] for b in blocks} == {"a", "bb", "ccc"}
    # records appear in call order: the timed calls and the records line up
    assert [x["method"] for x in recs] == [n for n, _ in timed]
    # multi-turn: turn 2 sees the same method's turn-1 answer
    n_checked = 0
    for x, (name, (pid,)) in zip(recs, timed):
        m = prompts[pid]
        assert x["method"] == name
        if x["turn"] == 1:
            first = next(
                y
                for y in recs
                if y["repeat"] == x["repeat"]
                and y["turn"] == 0
                and y["question_id"] == 1
                and y["method"] == name
            )
            assert [u["content"] for u in m] == ["t1", first["text"], "t2"]
            assert (
                m[1]["role"] == "assistant"
                and first["text"] == f"ans[{len(name)}, {first['ids'][1]}]"
            )
            n_checked += 1
        else:
            assert len(m) == 1
    assert n_checked == 2 * 3
    assert all(x["tokens_per_s"] == pytest.approx(200) for x in recs)


def test_all_methods_skipped_is_an_error():
    with pytest.raises(VeridraftError, match="no method can run"):
        run_protocol(
            [Question(1, "qa", ["x"])],
            [Fake("a", [], "nope")],
            lambda m: [0],
            str,
            Protocol(progress=False, log=lambda s: None),
        )


class Remembers(Method):
    """A method whose drafter keeps process memory, as SuffixDecoding's global trie does: each
    run records whether an earlier run's entry is still there, then leaves its own."""

    def __init__(self, name, seen):
        super().__init__(name)
        self.seen = seen

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed):
        from veridraft.drafters import suffix

        self.seen.append(bool(suffix._GLOBAL))
        suffix._GLOBAL[("test", len(self.seen))] = object()
        return RunOutput(ids=[1, 2], wall_s=0.01, prefill_s=0.001)


def test_measured_runs_never_draft_from_the_warm_up_or_an_earlier_repeat():
    from veridraft.drafters import suffix

    suffix._GLOBAL.clear()
    seen = []
    qs = [Question(1, "qa", ["a"]), Question(2, "qa", ["b"])]
    run_protocol(
        qs,
        [Remembers("m", seen)],
        lambda messages: [0],
        str,
        Protocol(repeats=2, warmup=1, progress=False, log=lambda s: None),
    )
    # warm-up, then per repeat: the first run starts clean, the second keeps the first's entry
    assert seen == [False, False, True, False, True]
    suffix._GLOBAL.clear()


def test_forgetting_clears_every_drafters_process_memory():
    from veridraft.drafters import forget_earlier_generations, recycle, suffix

    suffix._GLOBAL["x"] = object()
    recycle._TABLES[(0, 1, 2)] = object()
    forget_earlier_generations()
    assert not suffix._GLOBAL and not recycle._TABLES
