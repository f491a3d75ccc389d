"""Per-generation statistics with vLLM-style names.

tau (mean acceptance length) counts the bonus token, so plain decoding has tau = 1.00.
alpha (acceptance rate) = accepted draft tokens / drafted tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    new_tokens: int = 0
    prompt_tokens: int = 0
    target_forwards: int = 0  # verification forwards, prefill excluded
    drafted: int = 0
    accepted: int = 0
    emitted_in_rounds: int = 0  # tokens committed by verification rounds (bonus included)
    drafted_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    total_s: float = 0.0
    method: str = "ar"
    verify: str = "strict"  # the acceptance rule (rules.py)
    lossy: bool = False  # a lossy rule: the output may differ from plain decoding's
    relaxed: int = 0  # accepted draft tokens that differ from the target's choice (lossy rules)
    notes: list[str] = field(default_factory=list)
    # why this drafter is expected to be slower than plain decoding here (profile, cost model)
    warnings: list[str] = field(default_factory=list)

    def record_round(self, n_drafted: int, n_accepted: int) -> None:
        self.target_forwards += 1
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.emitted_in_rounds += n_accepted + 1
        while len(self.drafted_per_pos) < n_drafted:
            self.drafted_per_pos.append(0)
            self.accepted_per_pos.append(0)
        for i in range(n_drafted):
            self.drafted_per_pos[i] += 1
            if i < n_accepted:
                self.accepted_per_pos[i] += 1

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward, bonus included (plain decoding: 1.00)."""
        return self.emitted_in_rounds / self.target_forwards if self.target_forwards else 1.0

    @property
    def alpha(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def acceptance_per_pos(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_pos, self.drafted_per_pos)]

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tau=self.tau,
            alpha=self.alpha,
            acceptance_per_pos=self.acceptance_per_pos,
            tokens_per_s=self.tokens_per_s,
            decode_s=self.decode_s,
        )
        return d

    def summary(self) -> str:
        s = (
            f"{self.new_tokens} tokens in {self.total_s:.2f} s ({self.tokens_per_s:.1f} tokens/s, "
            f"prefill {self.prompt_tokens} tokens in {self.prefill_s * 1000:.0f} ms)"
        )
        if self.drafted or self.method != "ar":
            alpha = "n/a" if self.alpha is None else f"{self.alpha:.2f}"
            s += (
                f" | {self.method}: tau {self.tau:.2f}, alpha {alpha}, "
                f"{self.target_forwards} target forwards, draft {self.draft_s:.2f} s, "
                f"verify {self.verify_s:.2f} s, other {self.other_s:.2f} s"
            )
        if self.lossy:
            s += (
                f" | LOSSY verification {self.verify}: {self.relaxed} accepted tokens differ "
                "from the model's choice"
            )
        return s

    def details(self) -> str:
        """Multi-line report for --stats."""
        lines = [self.summary()]
        if self.drafted_per_pos:
            per = " ".join(f"{a:.2f}" for a in self.acceptance_per_pos)
            lines.append(f"acceptance per draft position: {per}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        lines.extend(self.notes)
        return "\n".join(lines)
