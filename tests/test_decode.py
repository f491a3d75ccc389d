"""The decode loop's contract with drafters: the target-cache check after propose, the Round
that update receives (scores only on request, measured times), the older update signature, and
a reusable prefilled prompt."""

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.decode import decode, prefill
from veridraft.draft import Draft, Round
from veridraft.errors import VeridraftError
from veridraft.sampling import SamplingParams

PROMPT = [1, 5, 3, 7, 2, 9, 4]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-decode"), layers=2)


def run(net, drafter=None, n=12, **kw):
    return decode(
        net,
        PROMPT,
        max_new_tokens=n,
        sampling=GREEDY,
        generator=torch.Generator().manual_seed(0),
        drafter=drafter,
        **kw,
    )


class Proposer:
    """Proposes the target's own greedy continuation, so drafts are (mostly) accepted."""

    name = "proposer"

    def __init__(self, k: int = 3) -> None:
        self.k = k
        self.rounds: list[Round] = []

    def prefill(self, ctx) -> None:
        pass

    def propose(self, ctx, max_tokens: int) -> Draft:
        start = ctx.cache.length
        toks, x = [], ctx.ids[-1]
        for _ in range(min(self.k, max_tokens)):
            x = int(ctx.target(torch.tensor([x]), ctx.cache)[-1].argmax())
            toks.append(x)
        ctx.cache.truncate(start)  # wrote past the committed length only: allowed
        return Draft(tokens=toks)

    def update(self, rnd: Round) -> None:
        self.rounds.append(rnd)


class LeavesCacheLonger(Proposer):
    name = "grows-cache"

    def propose(self, ctx, max_tokens: int) -> Draft:
        ctx.target(torch.tensor([ctx.ids[-1]]), ctx.cache)  # and never rolls back
        return Draft(tokens=[])


class WritesBelowCommitted(Proposer):
    name = "overwrites"

    def propose(self, ctx, max_tokens: int) -> Draft:
        n = ctx.cache.length
        ctx.cache.truncate(n - 1)  # rewrites the last committed position (with other ids) ...
        ctx.target(torch.tensor([0]), ctx.cache)
        assert ctx.cache.length == n  # ... and restores the length: only the watermark sees it
        return Draft(tokens=[])


def test_a_drafter_that_restores_the_cache_passes_and_stays_lossless(net):
    ref, _ = run(net)
    out, stats = run(net, Proposer())
    assert out == ref and stats.accepted > 0


@pytest.mark.parametrize(
    "cls, what",
    [
        (LeavesCacheLonger, r"its length \d+ -> \d+"),
        (WritesBelowCommitted, r"below the committed length"),
    ],
)
def test_a_drafter_that_changes_the_target_cache_is_named(net, cls, what):
    with pytest.raises(VeridraftError, match=rf"drafter {cls.name} changed the target's KV cache"):
        run(net, cls())
    with pytest.raises(VeridraftError, match=what):
        run(net, cls())


def test_update_gets_the_round_with_times_and_ids_but_no_scores_unless_asked(net):
    d = Proposer()
    out, stats = run(net, d)
    assert len(d.rounds) == stats.target_forwards
    ids = PROMPT + out
    for r in d.rounds:
        assert r.scores is None
        assert r.draft_s > 0 and r.verify_s > 0
        assert r.committed[-1] == r.next_token and len(r.committed) == r.n_accepted + 1
        assert 0 <= r.n_accepted <= r.drafted
    assert d.rounds[-1].ids[: len(ids)] == ids  # the committed ids, prompt included
    assert sum(r.drafted for r in d.rounds) == stats.drafted


def test_scores_are_the_verification_logits_when_the_drafter_asks(net):
    d = Proposer()
    d.wants_scores = True
    out, _ = run(net, d)
    seen = 0
    for r in d.rounds:
        assert r.scores is not None and r.scores.shape == (r.drafted + 1, 16)
        # the target's greedy choice on each verified row is what was committed
        rows = r.scores.argmax(-1).tolist()
        assert rows[: r.n_accepted + 1] == r.committed
        seen += 1
    assert seen == len(d.rounds) > 0


def test_a_drafter_with_the_older_update_signature_still_works(net):
    calls = []

    class Old(Proposer):
        name = "old-style"

        def update(self, n_accepted: int, next_token: int) -> None:
            calls.append((n_accepted, next_token))

    ref, _ = run(net)
    out, stats = run(net, Old())
    assert out == ref
    assert len(calls) == stats.target_forwards
    assert all(isinstance(n, int) and isinstance(t, int) for n, t in calls)


def test_a_prefilled_prompt_is_reused_and_gives_the_same_ids(net):
    ref, _ = run(net, n=10)
    pf = prefill(net, PROMPT, len(PROMPT) + 10 + 16 + 1)
    for drafter in (None, Proposer(), None):
        out, stats = run(net, drafter, n=10, prefilled=pf)
        assert out == ref
    with pytest.raises(VeridraftError, match="differs from prompt_ids"):
        decode(
            net,
            PROMPT[:-1],
            max_new_tokens=4,
            sampling=GREEDY,
            generator=torch.Generator(),
            prefilled=pf,
        )
    with pytest.raises(VeridraftError, match="prefill with a larger max_len"):
        run(net, n=40, prefilled=pf)


def test_the_loop_does_not_import_the_drafters():
    import subprocess
    import sys

    code = (
        "import sys, veridraft.decode, veridraft.verify; "
        "print(sorted(m for m in sys.modules if m.startswith(('veridraft.drafters', 'rapidfuzz'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
