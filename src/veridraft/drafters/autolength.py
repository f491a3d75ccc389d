"""Cost-aware draft length from what a drafter measures while it runs (`mode=auto`).

A drafter whose draft steps are not free (a separate model) should draft only as far as the
acceptance pays for it, and not at all when it cannot - then a round is a plain decoding step
and the loss against plain decoding is bounded by the occasional probe. Each round the drafter
reports how long it drafted, how long the target took to verify (measured by the decode loop and
passed to `update` in its `Round`) and how many proposed tokens were accepted; the next
round's length is the k that maximises expected tokens per second,

    (1 + a + ... + a^k) / (k * d + v(k + 1))    against    1 / v(1)

with a the per-token acceptance (decayed counts of a geometric model), d the draft seconds per
draft token and v(n) the verification seconds for n positions (v(1) from rounds that drafted
nothing, the per-position slope from rounds that did). Nothing is timed in advance, so it
adapts to the machine, the load and the text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class AutoLength:
    max_k: int
    probe_every: int = 8  # rounds without drafting before one probe round re-measures a;
    # doubled after each probe that does not restart drafting, up to max_probe_every: a probe
    # makes the draft model catch up on all the text since its last round (the whole prompt
    # the first time), which a draft that keeps losing should not pay often
    max_probe_every: int = 64
    probe_k: int = 4  # enough accepted tokens in one probe to move the acceptance estimate
    remeasure_every: int = 32  # rounds of drafting before one k = 0 round re-measures v(1)
    decay: float = 0.95  # per-round weight of the past in every estimate
    # acceptance: decayed accepted / decayed trials (prior a = 0.5 on 2 pseudo-trials)
    acc: float = 1.0
    trials: float = 2.0
    draft_s: float | None = None  # seconds per draft token
    v1: float | None = None  # seconds to verify 1 position (a round with no draft)
    slope: float | None = None  # extra verify seconds per extra position
    rounds_idle: int = 0
    rounds_busy: int = 0
    _interval: int = field(default=0, repr=False)
    _probing: bool = field(default=False, repr=False)
    # when `drafted` was called: the verification time of callers that do not pass one
    _t: float | None = field(default=None, repr=False)

    @property
    def alpha(self) -> float:
        return self.acc / self.trials

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def expected_rate(self, k: int) -> float:
        """Expected committed tokens per second at draft length k (needs v1)."""
        if self.v1 is None:
            return 0.0
        if k == 0:
            return 1.0 / self.v1
        a = self.alpha
        tokens = sum(a**i for i in range(k + 1))
        cost = k * (self.draft_s or 0.0) + self.v1 + k * (self.slope or 0.0)
        return tokens / cost

    def choose(self, limit: int) -> int:
        """The draft length for this round (0: propose nothing)."""
        limit = min(limit, self.max_k)
        if limit <= 0:
            return 0
        if self.v1 is None or self.rounds_busy >= self.remeasure_every:
            self.rounds_busy = 0  # (re-)measure plain verification
            return 0
        if self.draft_s is None:  # no draft cost known yet: try the longest draft
            return limit
        k = max(range(limit + 1), key=self.expected_rate)
        if self._probing:  # the last round was a probe: did it make drafting pay again?
            self._probing = False
            interval = self._interval or self.probe_every
            self._interval = self.probe_every if k else min(2 * interval, self.max_probe_every)
        if k == 0:
            self.rounds_idle += 1
            if self.rounds_idle >= (self._interval or self.probe_every):
                self.rounds_idle = 0
                self._probing = True
                return min(self.probe_k, limit)
        else:
            self.rounds_idle = 0
            self.rounds_busy += 1
        return k

    def drafted(self, k: int, seconds: float) -> None:
        """The drafter spent `seconds` drafting k tokens this round; verification starts."""
        if k > 0:
            self.draft_s = self._ema(self.draft_s, seconds / k)
        self._t = time.perf_counter()

    def verified(self, proposed: int, accepted: int, seconds: float | None = None) -> None:
        """The target took `seconds` to verify `proposed` tokens and accepted `accepted` of them.
        Without `seconds`, the time since `drafted` stands in for it."""
        t, self._t = self._t, None
        if seconds is None:
            if t is None:
                return
            seconds = time.perf_counter() - t
        v = seconds
        if proposed == 0:
            self.v1 = self._ema(self.v1, v)
            return
        if self.v1 is not None:
            self.slope = self._ema(self.slope, max(0.0, (v - self.v1) / proposed))
        self.acc = self.decay * self.acc + accepted
        self.trials = self.decay * self.trials + accepted + (accepted < proposed)
