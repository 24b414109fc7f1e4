"""``python -m property_tests``: the conformance suite against a running brain."""

from .conformance.cli import main

raise SystemExit(main())
