"""What a speculative round costs on this machine, and the draft length that pays best.

`veridraft profile --model M [--precision P]` measures, for one model in one precision on one
machine, the time of a target forward over T = 1, 2, 4, 8, 16 new tokens at a short and a long
context, and the time of one step of each drafter; it stores them as JSON (`CostModel.save`).
From those figures, with i.i.d. acceptance rate alpha and k draft tokens per round:

    tokens per round  E(alpha, k) = sum_{i=0..k} alpha^i            (the bonus token included)
    cost per round    C(k)        = cost(T=k+1) + k * draft_step      (in units of cost(T=1))
    speedup           S(alpha, k) = E(alpha, k) / C(k)

`best_k(alpha, draft_step_cost)` maximises S over k = 1..16 (or returns 0 when no k beats plain
decoding); `break_even_alpha(k, draft_cost)` is the alpha where S = 1. Costs between measured T
are interpolated linearly; draft costs are fractions of a one-token target forward (ngram ~ 0).

Files: ``<model folder>/profile-<precision>-<machine id>.json`` when the folder is writable, else
``$VERIDRAFT_HOME/profiles/cost.<model name>.<precision>.<machine id>.json``. The machine id
digests the CPU model, the core count and torch's thread count, since all three change costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "veridraft-cost/1"
MAX_K = 16


def machine_id(threads: int | None = None) -> str:
    import torch

    from .models.kernels import cpu_name

    cpu = cpu_name()
    n = threads if threads is not None else torch.get_num_threads()
    key = f"{cpu}|{os.cpu_count()}|{n}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _at_t(row: dict[int, float], t: float) -> float:
    """A measured row's ms at t new tokens: linear between measured T, proportional beyond."""
    ts = sorted(row)
    if t <= ts[0]:
        return row[ts[0]]
    for a, b in zip(ts, ts[1:]):
        if t <= b:
            return row[a] + (row[b] - row[a]) * (t - a) / (b - a)
    return row[ts[-1]] * t / ts[-1]  # beyond the table: proportional (pessimistic)


TABLES = ("forward_ms", "tree_ms", "bytes_bound_ms", "compute_bound_ms")  # context -> T -> ms


@dataclass
class CostModel:
    model: str
    precision: str
    machine: str  # machine_id()
    threads: int
    # context -> T -> median ms of a target forward over T new tokens at that context
    forward_ms: dict[int, dict[int, float]]
    # drafter name -> median ms of one draft step ("ngram": one propose() call)
    draft_ms: dict[str, float] = field(default_factory=dict)
    # context -> T -> median ms of a forward over a root and T - 1 token-tree nodes (tree
    # attention gathers each row's ancestors, so it may cost more than a chain of T)
    tree_ms: dict[int, dict[int, float]] = field(default_factory=dict)
    # context -> T -> what this machine bounds that forward at, ms: its bytes (weights and KV
    # read once) at the copy bandwidth, its weight matmuls' multiply-adds at the matmul
    # kernel's in-cache rate (profiles from before these were measured have neither)
    bytes_bound_ms: dict[int, dict[int, float]] = field(default_factory=dict)
    compute_bound_ms: dict[int, dict[int, float]] = field(default_factory=dict)
    bandwidth_GBps: float = 0.0  # copy bandwidth, best of several
    matmul_GMACs: float = 0.0  # the matmul kernel's in-cache multiply-adds per second, / 1e9
    # the peak of the vector instruction those matmuls multiply with (models/peak.py), / 1e9
    peak_instruction: str = ""
    peak_GMACs: float = 0.0
    cpu: str = ""
    torch: str = ""
    command: str = ""
    created: str = ""

    # -- costs --

    def forward(self, t: float, context: int | None = None, tree: bool = False) -> float:
        """ms of a forward over t new tokens (linear between measured T, proportional beyond)
        at `context` cached positions: linear between the measured contexts, and beyond the
        longest along the line through the two longest (every row's attention reads each cached
        position, so a row's cost grows with the context; never below the longest's figure).
        tree=True: over a root and t - 1 tree nodes, when the profile measured trees."""
        table = self.tree_ms if tree and self.tree_ms else self.forward_ms
        ctxs = sorted(table)
        if context is None or context <= ctxs[0] or len(ctxs) == 1:
            return _at_t(table[ctxs[0]], t)
        for a, b in zip(ctxs, ctxs[1:]):
            if context <= b:
                fa, fb = _at_t(table[a], t), _at_t(table[b], t)
                return fa + (fb - fa) * (context - a) / (b - a)
        a, b = ctxs[-2], ctxs[-1]
        fa, fb = _at_t(table[a], t), _at_t(table[b], t)
        return fb + max(0.0, fb - fa) * (context - b) / (b - a)

    def relative(self, t: float, context: int | None = None, tree: bool = False) -> float:
        """cost(T=t) / cost(T=1) (of the same kind: a chain, or a tree)."""
        return self.forward(t, context, tree) / self.forward(1, context, tree)

    def draft_cost(self, drafter: str, context: int | None = None) -> float | None:
        """One step of `drafter` as a fraction of a one-token target forward."""
        ms = self.draft_ms.get(drafter)
        return None if ms is None else ms / self.forward(1, context)

    # -- decisions --

    def speedup(
        self, alpha: float, k: int, draft_step_cost: float = 0.0, context: int | None = None
    ) -> float:
        """Expected speedup over plain decoding with k draft tokens per round."""
        if k <= 0:
            return 1.0
        tokens = sum(alpha**i for i in range(k + 1))
        return tokens / (self.relative(k + 1, context) + k * draft_step_cost)

    def best_k(
        self,
        alpha: float,
        draft_step_cost: float = 0.0,
        context: int | None = None,
        max_k: int = MAX_K - 1,
    ) -> int:
        """The draft length with the highest expected speedup (0: drafting does not pay)."""
        best, best_s = 0, 1.0
        for k in range(1, max_k + 1):
            s = self.speedup(alpha, k, draft_step_cost, context)
            if s > best_s + 1e-9:
                best, best_s = k, s
        return best

    def best_nodes(
        self,
        path_probs: list[float],
        node_cost: float = 0.0,
        context: int | None = None,
    ) -> int:
        """How many nodes of a token tree to verify (0: drafting does not pay).

        `path_probs` are the candidate nodes' probabilities of lying on the accepted path, in
        best-first order (each node after its parent, so every prefix is a tree). n nodes are
        expected to commit 1 + sum(path_probs[:n]) tokens for a forward over n + 1 rows; the
        n with the most tokens per unit of measured cost wins. Chains are the one-branch case.
        """
        best, best_s, mass = 0, 1.0, 1.0
        for n, p in enumerate(path_probs, start=1):
            mass += p
            s = mass / (self.relative(n + 1, context, tree=True) + n * node_cost)
            if s > best_s + 1e-9:
                best, best_s = n, s
        return best

    def break_even_alpha(
        self, k: int, draft_cost: float = 0.0, context: int | None = None
    ) -> float | None:
        """The acceptance rate at which k-token drafting merely matches plain decoding
        (None: no alpha <= 1 is enough)."""
        if self.speedup(1.0, k, draft_cost, context) < 1.0:
            return None
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if self.speedup(mid, k, draft_cost, context) < 1.0:
                lo = mid
            else:
                hi = mid
        return hi

    # -- file --

    def to_json(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT
        for key in TABLES:
            d[key] = {
                str(c): {str(t): v for t, v in row.items()} for c, row in getattr(self, key).items()
            }
        return d

    @classmethod
    def from_json(cls, d: dict) -> CostModel:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {d.get('format')!r})")
        d = {k: v for k, v in d.items() if k != "format"}
        for key in TABLES:
            d[key] = {
                int(c): {int(t): float(v) for t, v in row.items()}
                for c, row in d.get(key, {}).items()
            }
        d["draft_ms"] = {str(k): float(v) for k, v in d.get("draft_ms", {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cost-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # not mkstemp's 0600: the file may be shared
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> CostModel:
        return cls.from_json(json.loads(Path(path).read_text()))


# -- where the files live --


def _home() -> Path:
    return Path(os.environ.get("VERIDRAFT_HOME", "~/.cache/veridraft")).expanduser()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cost_paths(model, precision: str | None = None, machine: str | None = None) -> list[Path]:
    """Candidate files for a LoadedModel (or anything with .name / .path / .precision), in
    lookup order: next to the model, then under $VERIDRAFT_HOME/profiles/."""
    precision = precision or getattr(model, "precision", "fp32")
    machine = machine or machine_id()
    out = []
    folder = getattr(model, "path", None)
    if folder is not None:
        out.append(Path(folder) / f"profile-{precision}-{machine}.json")
    name = _slug(str(getattr(model, "name", None) or (Path(folder).name if folder else "model")))
    out.append(_home() / "profiles" / f"cost.{name}.{precision}.{machine}.json")
    return out


def save_cost(model, cost: CostModel) -> Path:
    """Write next to the model when its folder is writable, else under $VERIDRAFT_HOME."""
    paths = cost_paths(model, cost.precision, cost.machine)
    for p in paths:
        if p is not paths[-1] and not p.parent.is_dir():  # never create a model folder
            continue
        try:
            return cost.save(p)
        except OSError:
            continue
    raise OSError(f"cannot write a cost profile to any of {', '.join(map(str, paths))}")


def load_cost(model, precision: str | None = None) -> CostModel | None:
    """The cost profile measured for this model, precision and machine, or None. A file that
    does not parse is ignored (a cost model only tunes defaults; it never changes outputs)."""
    if model is None:
        return None
    for p in cost_paths(model, precision):
        if p.is_file():
            try:
                return CostModel.read(p)
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return None


# -- explaining a generation --


def explain(stats, cost: CostModel | None, key: str | None = None) -> list[str]:
    """Lines for Stats.notes: was drafting worth it on this machine, and why (not).

    The draft-step cost is the profile's figure for exactly this drafter (`key`, the drafter's
    `cost_key`: same method, skip set, draft head, draft model); without one, the draft time
    this generation measured, and the first line says so."""
    if cost is None or not stats.drafted or not stats.target_forwards:
        return []
    k = stats.drafted / stats.target_forwards  # mean draft length per round
    alpha = stats.accepted / stats.drafted
    k_int = max(1, round(k))
    lines = []
    draft = cost.draft_cost(key or _drafter_key(stats.method))
    if draft is None:
        draft = stats.draft_s / stats.drafted * 1e3 / cost.forward(1)
        lines.append(
            f"cost model: no profiled draft-step figure for {stats.method}; using this "
            f"generation's measured draft time ({draft:.2f} of a target forward per draft token)"
        )
    expect = cost.speedup(alpha, k_int, draft)
    need = cost.break_even_alpha(k_int, draft)
    if need is None:
        lines.append(
            f"cost model: at k={k_int} a round costs more than {k_int + 1} plain steps on this "
            f"machine ({cost.precision}); no acceptance rate makes {stats.method} pay"
        )
    elif alpha < need:
        lines.append(
            f"cost model: this drafter's acceptance {alpha:.2f} is below the {need:.2f} this "
            f"machine needs at k={k_int} ({cost.precision}); expect a slowdown "
            f"(predicted x{expect:.2f})"
        )
    else:
        lines.append(
            f"cost model: acceptance {alpha:.2f} at k={k_int} predicts x{expect:.2f} over plain "
            f"decoding on this machine ({cost.precision}; break-even {need:.2f})"
        )
    best = cost.best_k(alpha, draft)
    if best != k_int:
        lines.append(
            f"cost model: at acceptance {alpha:.2f} the best draft length here is "
            + (f"k={best} (x{cost.speedup(alpha, best, draft):.2f})" if best else "0 (no drafting)")
        )
    return lines


def _drafter_key(method: str) -> str | None:
    """The stored figure a drafter without a `cost_key` may use: only ngram's, whose lookup
    does not depend on settings; the others' figures hold for one skip set or draft model."""
    m = (method or "").split(":", 1)[0].lower()
    return "ngram" if m == "ngram" else None
