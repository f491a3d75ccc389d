"""`python -m veridraft.bench ...`: the same as `veridraft bench ...`."""

from .harness import main

raise SystemExit(main())
