"""Benchmarks: offline throughput (``throughput``) with the transformers baselines
(``hf_baselines``), and the serving load generator (``serve``) with its stand-in server."""
