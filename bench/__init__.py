"""Benchmarks, the two-node cluster demo and the README's generated Results section: outside the
library. They may import every half (and the top CLI imports them, lazily, for `selfspec bench`
and `selfspec cluster-demo`); nothing in core/, specialize/, router/, serve/ or evaluation/
imports them (tests/test_architecture.py)."""
