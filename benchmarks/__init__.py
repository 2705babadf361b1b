"""Speed and memory figures, run by `make bench` (not by the tests).

Each `bench_*.py` module has a `main()` that measures side by side in one run and prints its
figures as `name=value` lines, the headline figure last.
"""
