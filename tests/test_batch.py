"""Continuous batching (batch.py): every request of a batch gets bitwise the ids it gets alone,
greedy and sampled with a seed, plain and drafted (ngram: chains, suffix: token trees),
requests joining mid-flight, with a control that catches rows leaking between requests; the KV
budget's admission control; the draft planner turning speculation off under load.

The hermetic tests run the tiny q4a8 Llama of tests/models/test_q4.py (the fused forward, the
shared slab of caches) and the tiny float32 Llama (interleaved forwards); the real one
smollm2-135m in q4a8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from veridraft import batch
from veridraft.batch import Batcher, DraftPlanner, Request, run_all
from veridraft.errors import VeridraftError
from veridraft.generate import generate_batch, generate_ids
from veridraft.models import fused, kernels

sys.path.insert(0, str(Path(__file__).parent / "models"))

needs_kernels = pytest.mark.skipif(
    kernels.isa() != "avx512bf16", reason="q4a8 and the fused forward need AVX512-BF16"
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_q4a8(tmp_path_factory):
    from test_q4 import _tiny

    from veridraft.models.q4 import apply_q4

    _, model, path = _tiny(tmp_path_factory.mktemp("q4"), {})
    apply_q4(model, path, a8=True)
    assert fused.uses_fused(model) and batch.row_invariant(model)
    return model


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    from drafting_helpers import tiny_llama

    net = tiny_llama(tmp_path_factory.mktemp("fp32"), vocab=96)
    assert not batch.row_invariant(net)
    return net


def _prompts(vocab: int, n: int = 4) -> list[list[int]]:
    """Prompts with repeats (so ngram and suffix find drafts), of different lengths."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        base = torch.randint(0, vocab, (5 + 3 * i,), generator=g).tolist()
        out.append((base * 4)[: 9 + 7 * i])
    return out


def _alone(net, prompts, lens, **kw):
    seeds = kw.pop("seeds", [None] * len(prompts))
    return [
        generate_ids(net, p, max_new_tokens=m, eos_ids=(), warn=False, seed=s, **kw)[0]
        for p, m, s in zip(prompts, lens, seeds)
    ]


CASES = [
    dict(draft=None),
    dict(draft="ngram"),
    dict(draft="suffix"),
    dict(draft=None, temperature=1.0, seeds=[11, 12, 13, 14]),
    dict(draft="ngram", temperature=1.0, seeds=[21, 22, 23, 24]),
]


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['draft']}-t{c.get('temperature', 0)}")
def test_batch_equals_alone_q4a8(tiny_q4a8, case):
    prompts, lens = _prompts(96), [24, 9, 31, 17]
    want = _alone(tiny_q4a8, prompts, lens, **case)
    calls = []
    run = tiny_q4a8.fused.net.forward
    # count the shared forwards: the batch must really put several sequences in one forward
    orig = batch.Batcher._forward
    batch.Batcher._forward = lambda self, seqs, rows: (
        calls.append(len(seqs)) or orig(self, seqs, rows)
    )
    try:
        got = generate_batch(tiny_q4a8, prompts, max_new_tokens=lens, eos_ids=(), **case)
    finally:
        batch.Batcher._forward = orig
    assert tiny_q4a8.fused.net.forward == run
    assert max(calls) == 4
    assert [ids for ids, _ in got] == want
    if case["draft"]:
        assert sum(st.drafted for _, st in got) > 0


@needs_kernels
def test_batch_python_layers_equal_alone(tiny_q4a8):
    """Without the fused forward the batched step runs the Python layers: still bitwise."""
    prompts, lens = _prompts(96, 3), [20, 12, 16]
    want = _alone(tiny_q4a8, prompts, lens, draft="suffix")
    keep = tiny_q4a8.fused
    tiny_q4a8.fused = None
    try:
        got = generate_batch(tiny_q4a8, prompts, max_new_tokens=lens, eos_ids=(), draft="suffix")
    finally:
        tiny_q4a8.fused = keep
    assert [ids for ids, _ in got] == want


@needs_kernels
def test_control_rows_that_see_each_other_are_caught(tiny_q4a8, monkeypatch):
    """The check above catches a step whose rows influence one another: a final norm that mixes
    in the mean of the forward's rows (a cross-request leak, or a batch-variant kernel) makes
    the batch's answers differ from the same model's answers alone."""
    prompts, lens = _prompts(96), [24, 24, 24, 24]
    keep = tiny_q4a8.fused
    norm = tiny_q4a8.norm.forward
    monkeypatch.setattr(tiny_q4a8, "fused", None)
    monkeypatch.setattr(tiny_q4a8.norm, "forward", lambda x: norm(x + 0.5 * x.mean(0)))
    want = _alone(tiny_q4a8, prompts, lens)
    got = generate_batch(tiny_q4a8, prompts, max_new_tokens=lens, eos_ids=())
    assert [ids for ids, _ in got] != want
    assert keep is not None


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=lambda c: str(c["draft"]))
def test_interleaved_fp32_equals_alone(tiny_fp32, case):
    prompts, lens = _prompts(96, 3), [20, 7, 15]
    seeds = case.get("seeds")
    case = dict(case, seeds=seeds[:3]) if seeds else case
    want = _alone(tiny_fp32, prompts, lens, **case)
    got = generate_batch(tiny_fp32, prompts, max_new_tokens=lens, eos_ids=(), **case)
    assert [ids for ids, _ in got] == want


@needs_kernels
def test_requests_join_mid_flight_and_wait_for_room(tiny_q4a8):
    prompts, lens = _prompts(96), [30, 12, 25, 20]
    want = _alone(tiny_q4a8, prompts, lens, draft="ngram")
    from veridraft.drafters import make_drafter

    def req(i):
        return Request(
            prompt_ids=prompts[i],
            max_new_tokens=lens[i],
            drafter=make_drafter("ngram", tiny_q4a8),
        )

    need = [len(p) + m + 16 + 1 for p, m in zip(prompts, lens)]
    # room for the first two only: the others wait for a finished one's positions
    b = Batcher(tiny_q4a8, kv_positions=need[0] + need[1] + 2, max_num_seqs=3)
    first = [b.add(req(0)), b.add(req(1))]
    for _ in range(5):
        b.step()
    assert [e.state for e in first] == ["running", "running"]
    late = [b.add(req(2)), b.add(req(3))]
    b.step()
    assert late[0].state == "waiting", "admitted beyond the KV budget"
    got = run_all(b, first + late)
    assert [ids for ids, _ in got] == want
    assert b.idle and b.usage() == 0.0
    with pytest.raises(VeridraftError, match="KV-cache positions.*raise the KV budget"):
        b.add(Request(prompt_ids=[1] * 50, max_new_tokens=60))


class _Flat:
    """A cost model whose forward costs grow with rows: 1 ms + 0.25 ms a row (no draft cost)."""

    def forward(self, t, context=None, tree=False):
        return 1.0 + 0.25 * t

    def draft_cost(self, key, context=None):
        return 0.0


@needs_kernels
def test_planner_turns_drafts_down_with_load(tiny_q4a8):
    from veridraft.drafters import make_drafter

    planner = DraftPlanner(_Flat())
    prompts = _prompts(96)

    def seqs(n):
        b = Batcher(tiny_q4a8, max_num_seqs=8, planner=planner)
        es = [
            b.add(Request(prompts[i % 4], 40, drafter=make_drafter("ngram", tiny_q4a8)))
            for i in range(n)
        ]
        while any(e.state != "running" for e in es):
            b.step()
        return [e.seq for e in es]

    one = planner.caps(seqs(1), [True])
    many = planner.caps(seqs(8), [True] * 8)
    assert one[0] > 0  # alone, a draft pays
    assert sum(many) < 8 * one[0]
    # a forward whose cost is all rows: speculation never pays, at any load
    planner.cost = type("C", (_Flat,), {"forward": lambda self, t, c=None, tree=False: t})()
    assert planner.caps(seqs(2), [True, True]) == [0, 0]
    # a sampled request keeps its own draft length (its seed's answer depends on it)
    assert planner.caps(seqs(2), [False, True])[0] == 16


@needs_kernels
def test_a_draft_model_the_planner_gives_no_rows_never_runs(tiny_q4a8):
    """Under a load where drafts never pay, requests drafting with a draft model get plain
    decoding's ids, and the draft model runs no forward at all: its pass over the prompt waits
    for a first draft that never comes."""
    from drafting_helpers import CountedNet

    from veridraft.drafters import ModelDrafter
    from veridraft.drafters.model import truncate_layers

    counted = CountedNet(truncate_layers(tiny_q4a8, 1))
    rows = counted.rows

    prompts, lens = _prompts(96), [40, 12, 9, 14]
    want = _alone(tiny_q4a8, prompts, lens)
    never = type("C", (_Flat,), {"forward": lambda self, t, c=None, tree=False: t})()

    def served(planner):
        b = Batcher(tiny_q4a8, max_num_seqs=4, planner=planner)
        # a long plain request first, so that no drafted one ever runs alone (a lone sequence
        # drafts as it would outside a batch)
        es = [b.add(Request(prompts[0], lens[0]))] + [
            b.add(Request(p, m, drafter=ModelDrafter(counted, label="m", mode="fixed")))
            for p, m in zip(prompts[1:], lens[1:])
        ]
        return [ids for ids, _ in run_all(b, es)]

    assert served(DraftPlanner(never)) == want
    assert rows == []
    # the control: a planner that lets the drafts through runs the draft model
    assert served(DraftPlanner(_Flat())) == want
    assert rows and max(rows) > 1  # a prompt's pass, then draft steps


def test_batched_refused_where_rows_are_not_invariant(tiny_fp32):
    with pytest.raises(VeridraftError, match="not row-invariant"):
        Batcher(tiny_fp32, batched=True)


@pytest.mark.real
@pytest.mark.slow
@needs_kernels
def test_smollm2_q4a8_batch_equals_alone(real_model_dir):
    from veridraft.loader import load

    real_model_dir("smollm2-135m")
    model = load("smollm2-135m", precision="q4a8")
    tok = model.tokenizer
    texts = [
        "def fibonacci(n):\n    ",
        "The capital of France is Paris. The capital of Italy is",
        "List three colours: red, green,",
    ]
    # the last prompt is prefilled in chunks of the batch (batch.prefill_chunk_for) beside the
    # others' decoding, where generate_ids prefills it in one forward
    long = " ".join(f"item {i}: the {i % 7}th colour of the list is blue." for i in range(60))
    prompts = [tok.encode(t) for t in texts] + [tok.encode(long)]
    assert 600 < len(prompts[-1]) < 1024
    lens = [40, 24, 32, 20]
    for case in (dict(draft=None), dict(draft="suffix"), dict(temperature=0.8, seeds=[1, 2, 3, 4])):
        want = _alone(model, prompts, lens, **case)
        got = generate_batch(model, prompts, max_new_tokens=lens, eos_ids=(), **case)
        assert [ids for ids, _ in got] == want, case


@needs_kernels
def test_logprobs_under_speculation_equal_plain(tiny_q4a8):
    """Each emitted token's log-probability comes from the very logits row that chose it, so a
    drafted (tree) run and a plain one report the same numbers, bitwise."""
    from veridraft.drafters import make_drafter

    prompts = _prompts(96, 3)

    def run(draft):
        b = Batcher(tiny_q4a8)
        es = [
            b.add(Request(p, 20, drafter=make_drafter(draft, tiny_q4a8), logprobs=3))
            for p in prompts
        ]
        out = run_all(b, es)
        return [e.logprobs for e in es], out

    plain, out_p = run(None)
    drafted, out_d = run("suffix")
    assert sum(st.accepted for _, st in out_d) > 0
    assert plain == drafted
    for lps, (ids, _) in zip(plain, out_p):
        assert [t for t, _, _ in lps] == ids
        assert all(top[0][0] == t and top[0][1] == v for t, v, top in lps)  # greedy: the likeliest


@needs_kernels
def test_newcomer_prefill_is_chunked_between_rounds(tiny_q4a8):
    """A long prompt joins in chunks, one per step, and the running request commits a round in
    every one of those steps: its inter-token latency holds while the newcomer loads."""
    g = torch.Generator().manual_seed(3)
    long = torch.randint(0, 96, (200,), generator=g).tolist()
    short = _prompts(96, 1)[0]
    want = _alone(tiny_q4a8, [short, long], [40, 10])
    b = Batcher(tiny_q4a8, prefill_chunk=64)
    first = b.add(Request(short, 40))
    while first.state != "running":
        b.step()
    late = b.add(Request(long, 10))
    grew = []
    while late.state != "running":
        before = len(first.seq.new)
        b.step()
        grew.append(len(first.seq.new) - before)
    assert grew == [1, 1, 1]  # 200 positions: chunks of 64, 64 and 72
    # the loop's clock: the chunks counted as prefill, the rounds as decode, and once every
    # prompt is in, steps add to decode alone
    assert b.busy_s["prefill"] > 0 and b.busy_s["decode"] > 0
    prefill, decode = b.busy_s["prefill"], b.busy_s["decode"]
    b.step()
    assert b.busy_s["prefill"] == prefill and b.busy_s["decode"] > decode
    got = run_all(b, [first, late])
    assert [ids for ids, _ in got] == want


@needs_kernels
@pytest.mark.parametrize("where", ["callback", "drafter"])
def test_a_request_that_fails_mid_round_leaves_the_others_exact(tiny_q4a8, where):
    """A request whose callback raises (a client that left) or whose drafter raises ends alone,
    between the shared forward and the others' commits: every other request still gets exactly
    its answer alone. (Ending the round at the failure would leave the later sequences with
    rows in their caches that were never committed.)"""
    from veridraft.drafters import make_drafter

    prompts = _prompts(96, 4)
    want = _alone(tiny_q4a8, prompts[1:], [20, 20, 20], draft="ngram")
    b = Batcher(tiny_q4a8)
    calls = []

    def leave(ids):
        calls.append(ids)
        if len(calls) == 3:
            raise RuntimeError("the client went away")

    class Broken(_Repeat):
        def propose(self, ctx, max_tokens):
            calls.append(max_tokens)
            if len(calls) == 3:
                raise RuntimeError("the drafter broke")
            return super().propose(ctx, max_tokens)

    bad = (
        Request(prompts[0], 20, on_tokens=leave)
        if where == "callback"
        else Request(prompts[0], 20, drafter=Broken())
    )
    first = b.add(bad)  # first in the batch: every other row comes after it
    rest = [b.add(Request(p, 20, drafter=make_drafter("ngram", tiny_q4a8))) for p in prompts[1:]]
    while any(e.state not in ("done", "error") for e in [first, *rest]):
        b.step()
    assert first.state == "error"
    assert str(first.error) in ("the client went away", "the drafter broke")
    assert [e.result[0] for e in rest] == want


class _Repeat:
    """A drafter that always proposes its full allowance: the last id, repeated."""

    name = "repeat"

    def prefill(self, ctx):
        pass

    def propose(self, ctx, max_tokens):
        from veridraft.draft import Draft

        return Draft(tokens=[ctx.ids[-1]] * max_tokens)

    def update(self, rnd):
        pass


@needs_kernels
def test_wide_steps_equal_alone(tiny_q4a8):
    """Eight sequences with 12-token drafts: steps far wider than a verification forward
    (> 64 rows) still give every sequence its answer alone."""
    prompts, lens = _prompts(96, 4) * 2, [30 + 2 * i for i in range(8)]
    want = _alone(tiny_q4a8, prompts, lens, draft=_Repeat(), max_draft=12)
    rows = []
    orig = batch.Batcher._forward
    batch.Batcher._forward = lambda self, seqs, r: (
        rows.append(sum(len(t) for t, _ in r)) or orig(self, seqs, r)
    )
    b = Batcher(tiny_q4a8)
    try:
        es = [b.add(Request(p, m, drafter=_Repeat(), max_draft=12)) for p, m in zip(prompts, lens)]
        got = run_all(b, es)
    finally:
        batch.Batcher._forward = orig
    assert max(rows) > 64
    assert [ids for ids, _ in got] == want


def test_planner_gives_the_rows_to_the_sequences_that_accept():
    """Two sequences, one accepting 90% of its drafts and one 10%, on a forward whose rows
    cost something: the first gets a long draft, the second none (one draft length for both
    would spend rows on the one that wastes them)."""
    from types import SimpleNamespace

    from veridraft.stats import Stats

    class Linear:
        def forward(self, t, context=None, tree=False):
            return 10.0 + 0.5 * t

        def draft_cost(self, key, context=None):
            return None

    def seq(accepted):
        return SimpleNamespace(
            drafter=object(), max_draft=8, stats=Stats(drafted=100, accepted=accepted)
        )

    caps = DraftPlanner(Linear()).caps([seq(90), seq(10), seq(90)], [True] * 3)
    assert caps[1] == 0 and caps[0] == caps[2] >= 4, caps


def test_planner_prices_a_newcomers_drafter_by_its_kinds_measured_cost():
    """A drafter that costs a forward's worth per token (a draft model on a busy CPU) stops
    drafting in the batch once measured, and a request that joins later with the same kind
    of drafter is priced by what it cost the others, not as free before its first draft."""
    from types import SimpleNamespace

    from veridraft.stats import Stats

    class Flat:
        def forward(self, t, context=None, tree=False):
            return 10.0

        def draft_cost(self, key, context=None):
            return None

    def seq(drafted, draft_s):
        st = Stats(drafted=drafted, accepted=drafted // 2, draft_s=draft_s, method="model:x")
        return SimpleNamespace(drafter=object(), max_draft=4, stats=st)

    planner = DraftPlanner(Flat())
    slow, fresh = seq(40, 0.8), seq(0, 0.0)  # 20 ms per drafted token, twice a forward
    assert planner.caps([slow, fresh], [True, True]) == [0, 0]
    planner.retire(slow)  # it leaves; its kind's cost stays
    assert planner.caps([fresh, seq(0, 0.0)], [True, True]) == [0, 0]
    # the control: a kind never measured drafts (nothing says it costs anything)
    other = SimpleNamespace(drafter=object(), max_draft=4, stats=Stats(method="ngram"))
    assert planner.caps([other, other], [True, True]) == [4, 4]


def test_planner_without_a_profile_learns_from_the_batchs_steps():
    """No cost profile: the caps stay the requests' own until the batch has measured forwards of
    two widths, then follow the measured cost (flat: drafts pay; steep: none do)."""
    from types import SimpleNamespace

    from veridraft.stats import Stats

    def seq():
        st = Stats(drafted=10, accepted=6)
        return SimpleNamespace(drafter=object(), max_draft=8, stats=st, new=[])

    seqs = [seq() for _ in range(4)]
    planner = DraftPlanner(None)
    assert planner.caps(seqs, [True] * 4) == [8] * 4
    for i in range(20):  # flat: 10 ms whatever the rows
        planner.observe(4 + i % 5, 10.0)
    assert min(planner.caps(seqs, [True] * 4)) > 0
    steep = DraftPlanner(None)
    for i in range(20):  # every row costs its own forward
        steep.observe(4 + i % 5, 10.0 * (4 + i % 5))
    assert steep.caps(seqs, [True] * 4) == [0] * 4
    assert steep.caps(seqs, [False, True, True, True])[0] == 8  # a sampled request keeps its own
    # a lone request waits for no one: it drafts as it would alone, whatever the fit says,
    # until its own rounds have been measured
    assert steep.caps(seqs[:1], [True]) == [8]


def test_planner_prices_wide_steps_by_the_measured_curve_not_a_line():
    """A CPU forward is flat up to a few rows and steep after: 10 ms up to 8 rows, then 5 ms a
    row more. A straight line through those steps prices 16 rows at about 30 ms and lets four
    sequences draft 3 tokens each; measured, 16 rows cost 50 ms and a round of drafts there
    loses, while one draft each (8 rows, 10 ms) still pays."""
    from types import SimpleNamespace

    from veridraft.batch import MeasuredCost
    from veridraft.stats import Stats

    def ms(rows):
        return 10.0 if rows <= 8 else 10.0 + 5.0 * (rows - 8)

    cost = MeasuredCost()
    for i in range(40):
        rows = (4, 8, 12, 16)[i % 4]
        cost.observe(rows, ms(rows) + (0.3 if i % 3 == 0 else 0.0))  # noise
    assert cost.forward(8) == pytest.approx(10.0, abs=0.31)
    assert cost.forward(16) == pytest.approx(50.0, abs=0.31)
    assert cost.forward(6) <= cost.forward(8) <= cost.forward(12)
    assert cost.forward(32) == pytest.approx(100.0, rel=0.01)  # past the widest: its per-row cost

    seqs = [
        SimpleNamespace(drafter=object(), max_draft=3, stats=Stats(drafted=100, accepted=70))
        for _ in range(4)
    ]
    planner = DraftPlanner(None)
    for i in range(40):
        rows = (4, 8, 12, 16)[i % 4]
        planner.observe(rows, ms(rows))
    assert planner.caps(seqs, [True] * 4) == [1] * 4


def _lone_rounds(planner, seq, rounds, tokens, ms, draft_ms):
    """Run `rounds` lone rounds through the planner: each emits `tokens`, its forward takes
    `ms` and its drafting `draft_ms`; return the caps it was given."""
    caps = []
    for _ in range(rounds):
        k = planner.caps([seq], [True], 100)[0]
        caps.append(k)
        seq.new.extend([0] * (tokens if k else 1))
        seq.stats.draft_s += draft_ms / 1000 if k else 0.0
        planner.observe(1 + k, ms if k else 10.0)
    return caps


def test_a_lone_sequence_whose_drafts_lose_stops_drafting():
    """Alone, a sequence drafts its own length until its measured rounds show drafting slower
    than one-token steps: then it stops, and its stats say why with both rates. The control:
    rounds that beat one-token steps keep drafting, however low the acceptance per drafted
    token (a token tree's)."""
    from types import SimpleNamespace

    from veridraft.stats import Stats

    class Flat:
        def forward(self, t, context=None, tree=False):
            return 10.0  # one-token steps: 100 tokens/s

        def draft_cost(self, key, context=None):
            return None

    def seq(drafted, accepted):
        st = Stats(drafted=drafted, accepted=accepted, method="model:x")
        return SimpleNamespace(drafter=object(), max_draft=4, stats=st, new=[])

    # 2 tokens per round in 15 ms forward + 10 ms drafting: 80 tokens/s, below 100
    planner, losing = DraftPlanner(Flat()), seq(40, 30)
    n = DraftPlanner.SOLO_SKIP + DraftPlanner.SOLO_ROUNDS
    caps = _lone_rounds(planner, losing, n + 3, tokens=2, ms=15.0, draft_ms=10.0)
    assert caps[:n] == [4] * n and caps[n:] == [0, 0, 0], caps
    assert "drafting switched off" in losing.stats.notes[0]
    assert "80.0 tokens/s" in losing.stats.notes[0] and "100.0" in losing.stats.notes[0]
    # the control: 4 tokens per round in 16 ms + 4 ms (200 tokens/s) with a tree's low
    # acceptance per drafted node (10%) keeps its drafts
    winning = seq(400, 40)
    assert _lone_rounds(planner, winning, n + 3, tokens=4, ms=16.0, draft_ms=4.0) == [4] * (n + 3)
    assert winning.stats.notes == []
    # the first drafting round (a draft model's pass over the prompt) is not held against it
    slow_start = seq(0, 0)
    planner.caps([slow_start], [True], 100)
    slow_start.new.extend([0] * 4)
    slow_start.stats.draft_s += 5.0
    planner.observe(5, 16.0)
    assert _lone_rounds(planner, slow_start, n, tokens=4, ms=16.0, draft_ms=4.0) == [4] * n
    # one-token steps the batch has run itself (the machine's pace now) outweigh the profile:
    # a profile whose steps cost 1 s would let the same losing rounds draft on
    slow_profile = type("C", (Flat,), {"forward": lambda self, t, c=None, tree=False: 1000.0})
    planner = DraftPlanner(slow_profile())
    assert _lone_rounds(planner, seq(40, 30), n + 1, tokens=2, ms=15.0, draft_ms=10.0)[n] == 4
    planner = DraftPlanner(slow_profile())
    for _ in range(3):
        planner.observe(1, 10.0)
    assert _lone_rounds(planner, seq(40, 30), n + 1, tokens=2, ms=15.0, draft_ms=10.0)[n] == 0
    # a sampled request (not adaptive) keeps its own draft length whatever its rounds give
    fixed = seq(40, 30)
    planner.solo[id(fixed)] = batch.Solo(seen=n + 1, rounds=n, ms=1000.0, tokens=1)
    assert planner.caps([fixed], [False], 100) == [4]
    planner.retire(losing)
    assert id(losing) not in planner.solo


@needs_kernels
def test_a_lone_request_served_by_a_losing_draft_model_switches_it_off(tiny_q4a8):
    """Served alone with a draft model whose rounds lose to one-token steps (by a cost model
    whose steps cost nearly nothing), a request stops drafting after the planner's measured
    rounds and still gets plain decoding's ids; with steps that cost a lot (the control) it
    drafts to the end."""
    from veridraft.drafters import ModelDrafter
    from veridraft.drafters.model import truncate_layers

    small = truncate_layers(tiny_q4a8, 1)
    prompt, n_new = _prompts(96)[2], 40
    want = _alone(tiny_q4a8, [prompt], [n_new])[0]

    def served(step_ms):
        cost = type("C", (_Flat,), {"forward": lambda self, t, c=None, tree=False: step_ms})()
        b = Batcher(tiny_q4a8, max_num_seqs=2, planner=DraftPlanner(cost))
        e = b.add(Request(prompt, n_new, drafter=ModelDrafter(small, label="m"), max_draft=2))
        ((ids, stats),) = run_all(b, [e])
        return ids, e.draft_lens, stats

    ids, lens, stats = served(1e-6)
    assert ids == want
    n = DraftPlanner.SOLO_SKIP + DraftPlanner.SOLO_ROUNDS
    assert lens[n:] and set(lens[n:]) == {0}, lens
    assert any("drafting switched off" in note for note in stats.notes)
    ids, lens, stats = served(1e6)
    assert ids == want and 0 not in lens[:-1], lens
    assert not any("switched off" in note for note in stats.notes)
