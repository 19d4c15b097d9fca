"""Peer methods the benchmark compares monai_cidir against (elastix through itk-elastix)."""
