"""`python -m veridraft ...`: the same as the `veridraft` command."""

from .cli import main

raise SystemExit(main())
