"""Choosing tokens: the sampler and everything a request's ``SamplingParams`` asks of it
(penalties, constraints, truncation, stops, logprobs, parallel sampling and beam search).
``hwlm.sampling_params`` (vLLM's import path) holds the parameters themselves."""
