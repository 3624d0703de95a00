"""Kernel sources: ``reference`` (pure torch), ``numba`` (cpu), later ``triton`` (cuda, rocm)."""
