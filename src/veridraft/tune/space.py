"""What the layerskip search explores: configurations (skip set, gamma0, K), the optimiser's
variables for them, and the hand-picked starting points."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..drafters.layerskip import DEFAULT_SKIPS, heuristic_skip
from ..drafters.params import format_layers
from ..models.base import Skip
from ..profiles import Profile

GAMMA_RANGE = (0.2, 0.95)
K_RANGE = (1, 16)
DEFAULT_GAMMA = 0.6
DEFAULT_K = 12


@dataclass(frozen=True)
class Config:
    attn: tuple[int, ...]
    mlp: tuple[int, ...]
    gamma: float = DEFAULT_GAMMA
    num_tokens: int = DEFAULT_K

    @property
    def skip(self) -> Skip:
        return Skip(attn=frozenset(self.attn), mlp=frozenset(self.mlp))

    def key(self) -> tuple:
        return (self.attn, self.mlp, round(self.gamma, 2), self.num_tokens)

    def describe(self) -> str:
        return (
            f"attn={format_layers(self.attn) or '-'} mlp={format_layers(self.mlp) or '-'} "
            f"gamma0={self.gamma:.2f} K={self.num_tokens}"
        )

    def spec(self) -> str:
        return (
            f"layerskip:attn={format_layers(self.attn)};mlp={format_layers(self.mlp)};"
            f"gamma={self.gamma:.3f};num_tokens={self.num_tokens}"
        )


def config_of(skip: Skip, gamma=DEFAULT_GAMMA, num_tokens=DEFAULT_K) -> Config:
    return Config(tuple(sorted(skip.attn)), tuple(sorted(skip.mlp)), float(gamma), int(num_tokens))


class Space:
    """Maps configurations to the optimiser's variables and back."""

    def __init__(self, n_layers: int, search_exit: bool) -> None:
        self.n = n_layers
        self.search_exit = search_exit
        w = len(str(n_layers - 1))
        self.attn_keys = [f"a{i:0{w}d}" for i in range(n_layers)]
        self.mlp_keys = [f"m{i:0{w}d}" for i in range(n_layers)]

    def bounds(self) -> dict:
        b = {k: (0.0, 1.0) for k in self.attn_keys + self.mlp_keys}
        if self.search_exit:
            b["gamma0"] = GAMMA_RANGE
            b["num_tokens"] = (float(K_RANGE[0]), float(K_RANGE[1]))
        return b

    def decode(self, x: dict) -> Config:
        attn = tuple(i for i, k in enumerate(self.attn_keys) if float(x[k]) > 0.5)
        mlp = tuple(i for i, k in enumerate(self.mlp_keys) if float(x[k]) > 0.5)
        if self.search_exit:
            g = min(max(float(x["gamma0"]), GAMMA_RANGE[0]), GAMMA_RANGE[1])
            k = int(round(min(max(float(x["num_tokens"]), K_RANGE[0]), K_RANGE[1])))
            return Config(attn, mlp, round(g, 3), k)
        return Config(attn, mlp)

    def encode(self, c: Config) -> dict:
        """A point inside the region of `c` (0.25 = kept, 0.75 = skipped)."""
        x = {k: (0.75 if i in c.attn else 0.25) for i, k in enumerate(self.attn_keys)}
        x.update({k: (0.75 if i in c.mlp else 0.25) for i, k in enumerate(self.mlp_keys)})
        if self.search_exit:
            x["gamma0"] = float(c.gamma)
            x["num_tokens"] = float(c.num_tokens)
        return x

    def valid(self, c: Config) -> bool:
        return not (len(c.attn) == self.n and len(c.mlp) == self.n)

    def mutate(self, c: Config, rng: random.Random) -> Config:
        """Flip 1-3 sub-layers (and, when searching exits, jitter gamma0 / K)."""
        attn, mlp = set(c.attn), set(c.mlp)
        for _ in range(rng.choice((1, 1, 2, 3))):
            s = attn if rng.random() < 0.5 else mlp
            s.symmetric_difference_update({rng.randrange(self.n)})
        g, k = c.gamma, c.num_tokens
        if self.search_exit and rng.random() < 0.5:
            g = round(min(max(g + rng.choice((-0.1, -0.05, 0.05, 0.1)), GAMMA_RANGE[0]), 0.95), 3)
            k = min(max(k + rng.choice((-2, -1, 1, 2)), K_RANGE[0]), K_RANGE[1])
        return Config(tuple(sorted(attn)), tuple(sorted(mlp)), g, k)


def hand_picked(model) -> Config:
    """The drafter's built-in default for this model (the hand-picked set, or the heuristic)."""
    n = model.net.config.n_layers
    skip = DEFAULT_SKIPS.get(getattr(model, "name", None)) or heuristic_skip(n)
    return config_of(skip)


def probe_configs(
    model, existing: Profile | None = None, search_exit: bool = False
) -> list[Config]:
    """Hand-picked starting points, scaled to the model's depth; the default set first (at the
    drafter's default gamma0 / K). When searching exits, the other sets start at a stricter
    exit (gamma0 0.8, K 8): on small models the cheap drafts are too unsure to run 12 steps."""
    n = model.net.config.n_layers
    out = [hand_picked(model)]
    if existing is not None:
        out.append(config_of(existing.skip))
    r = range
    for attn, mlp in (
        (r(n // 2, n - 1), ()),  # late attention only
        (r(n // 4, n - 1, 2), ()),  # every other attention, middle and late
        (r(n // 2, n - 2), r(2 * n // 3, n - 2)),  # late attention + a few late MLPs
        (r(2 * n // 3, n - 1), ()),  # a small late block of attention
        (r(n // 3, n - 1), r(n // 2, n - 4, 3)),
    ):
        out.append(config_of(Skip(attn=frozenset(attn), mlp=frozenset(mlp))))
    out.append(config_of(heuristic_skip(n)))
    if search_exit:
        out = out[:1] + [Config(c.attn, c.mlp, 0.8, 8) for c in out[1:]]
    seen, uniq = set(), []
    for c in out:
        if (c.attn or c.mlp) and c.key() not in seen and not (len(c.attn) == len(c.mlp) == n):
            seen.add(c.key())
            uniq.append(c)
    return uniq


# ------------------------------------------------------------------------ calibration
