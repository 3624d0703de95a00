"""hwlm: fast LLM serving on whatever hardware is present."""

__version__ = "0.1.0"
