"""`python -m ckaflow`: the command line (`ckaflow.cli`)."""

from ckaflow.cli import main

raise SystemExit(main())
