"""Benchmarks of monai_cidir (run as scripts, e.g. ``python benchmarks/compare.py --help``)."""
