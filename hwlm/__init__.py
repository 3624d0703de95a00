"""hwlm: fast LLM serving on whatever hardware is present."""

import os as _os

# In a source checkout used without installation, hwlm.backends and hwlm.kernels are the
# backends/ and kernels/ folders beside hwlm/ (an install maps them through package-dir).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_own_layout = all(
    _os.path.isfile(_os.path.join(_root, *parts))
    for parts in (("backends", "cpu.py"), ("kernels", "reference.py"), ("pyproject.toml",))
)
if _own_layout and _root not in __path__:
    __path__.append(_root)

from hwlm.beam_search import BeamSearchOutput, BeamSearchParams  # noqa: E402
from hwlm.llm import LLM  # noqa: E402  (after the path set-up above)
from hwlm.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from hwlm.sampling_params import SamplingParams  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "SamplingParams",
    "BeamSearchParams",
    "BeamSearchOutput",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "__version__",
]
