"""Property tests, and the protocol conformance suite (`python -m property_tests`).

The suite itself lives in `property_tests.conformance`; it drives any brain
over its sockets. The test files here run it against our own brain, show
that each of its rules bites, and check crash safety.
"""
