"""Evaluation data that veridraft generates itself (no download): the RULER-style retrieval
set (`veridraft.data.retrieval`)."""
