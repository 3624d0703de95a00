"""hwlm: fast LLM serving on whatever hardware is present."""

from hwlm.llm import LLM
from hwlm.outputs import CompletionOutput, Logprob, RequestOutput
from hwlm.sampling.beam_search import BeamSearchOutput, BeamSearchParams
from hwlm.sampling_params import SamplingParams

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
