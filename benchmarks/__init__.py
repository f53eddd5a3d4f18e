"""Benchmarks for rmt-fast (FLOPs scaling, latency, profiling, kernels); run them via ``rmt-fast-bench``."""
