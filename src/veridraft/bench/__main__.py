"""`python -m veridraft.bench ...`: the same as `veridraft bench ...`."""

from .cli import main

raise SystemExit(main())
