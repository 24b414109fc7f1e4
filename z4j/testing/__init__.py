"""Reusable test helpers: a throwaway Postgres cluster, brain runners, checkers.

They live in the package (as trio's own ``trio.testing`` does) so the test
suite, the benchmarks, the conformance suite and users share them.
"""
