"""Train drafters on this machine: `veridraft train head` (an EAGLE-3 draft head).

features.py computes the target's features over a corpus once (resumable shards), head.py shapes
a new head and runs the training-time test, trainer.py trains and reports held-back acceptance,
cli.py is the command.
"""
