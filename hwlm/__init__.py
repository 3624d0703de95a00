"""hwlm: fast LLM serving on whatever hardware is present."""

from hwlm.llm import LLM
from hwlm.outputs import CompletionOutput, Logprob, RequestOutput
from hwlm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
