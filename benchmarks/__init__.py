"""Developer benchmarks (not part of the installed package, not run by `make test`).

Run from the repository root: `python -m benchmarks.peers CKPT`. See benchmarks/README.md.
"""
