"""`python -m liveavatar ...`: the same command line as the `liveavatar` entry point."""

from liveavatar.cli import main

raise SystemExit(main())
