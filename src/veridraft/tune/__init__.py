"""`veridraft tune layerskip`: Bayesian search of the sub-layers self-speculation skips.

Draft & Verify (Zhang et al., ACL 2024, arXiv 2309.08168) drafts with the target itself, some
attention and MLP sub-layers bypassed; which ones decides the speedup, and the best set depends
on the model and the machine. Following the paper's search:

- 2L continuous variables in [0, 1] (attention of layers 0..L-1, then MLP of layers 0..L-1); a
  sub-layer is skipped when its variable is > 0.5. With `search_exit`, two more: the initial
  draft-exit threshold gamma0 and the maximum draft steps K.
- A Gaussian-process optimiser (`bayes_opt`, the library the paper's code uses; GP noise 1e-2),
  seeded ("probed") with hand-picked sets, the drafter's current default among them. Because 2L
  is large for a budget of tens of trials, every other trial is a local move (1-3 sub-layers
  flipped) from one of the best configurations so far; every trial is registered with the GP.
- The objective is the measured speedup of self-speculative greedy decoding over plain decoding
  on calibration prompts (default 8 dev-set prompts, half of them summarization, 32 new tokens).

Measuring (why a speedup and not raw tokens/s): the machine is shared and its speed drifts by
tens of percent within minutes (several-fold when other jobs start), far more than the
differences between neighbouring skip sets. Each trial therefore runs plain decoding (`ar`) back
to back with the self-speculative run on every calibration prompt (which of the two goes first
alternates) and scores est. ar time / self-speculative time, measured in the same minute. With
`baseline_prompts` B < N, ar runs on B prompts only (rotating) and stored per-prompt ar times
are scaled by the drift seen on them: cheaper, but noisy on a busy machine. Prefill is done once
per prompt before the search and reused (the KV cache of the prompt is kept, the first forward
returns the stored logits): the draft never runs during prefill, so it would only add cost and
noise. At the end, the top few configurations and the hand-picked default are re-measured,
interleaved per prompt against `ar`, and the best re-measured speedup wins (the hand-picked
default when nothing beats it).

Every trial is appended to a JSONL file next to the output profile; running the same command
again resumes: past trials are re-registered with the optimiser and the search goes on to
`iters` trials in total.
"""

from __future__ import annotations

import importlib

# Names importable from `veridraft.tune`, and the module that defines each. Loaded on first use
# so that `veridraft --help` builds the tune command's help without importing torch.
_EXPORTS = {
    "Config": "space",
    "Space": "space",
    "config_of": "space",
    "hand_picked": "space",
    "probe_configs": "space",
    "Calibration": "calibration",
    "calibration_questions": "calibration",
    "measure": "calibration",
    "read_trials": "trials",
    "trials_path_for": "trials",
    "TuneResult": "search",
    "tune_layerskip": "search",
    "add_tune_parser": "cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
