"""Property tests, and the protocol conformance suite (`python -m property_tests`).

The suite itself lives in `property_tests.conformance`; it drives any brain
over its sockets. The test files here run it against our own brain, show
that each of its rules bites, and check crash safety.
"""

import sys

try:
    import hypothesis  # noqa: F401
except ModuleNotFoundError as missing:
    if missing.name != "hypothesis":
        raise
    sys.stderr.write(
        "The conformance suite needs Hypothesis, which the brain itself does not:"
        " install it with  python -m pip install 'z4j-trio[conformance]'"
        "  (or '.[conformance]' from a checkout).\n"
    )
    raise SystemExit(2) from None
