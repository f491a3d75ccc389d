"""`python -m veridraft.tune ...`: the same as `veridraft tune ...`."""

from .cli import main

raise SystemExit(main())
