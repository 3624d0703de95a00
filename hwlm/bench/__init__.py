"""Benchmark helpers: prompt generation and the Hugging Face transformers baselines."""
