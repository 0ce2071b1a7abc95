"""Benchmarks run by ``qkdproxy bench``."""
