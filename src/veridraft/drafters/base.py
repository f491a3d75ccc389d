"""The drafter contract now lives in `veridraft.draft`; these names stay importable from here."""

from ..draft import DecodeContext, Draft, DraftEnv, Drafter, Round, as_round

__all__ = ["DecodeContext", "Draft", "DraftEnv", "Drafter", "Round", "as_round"]
