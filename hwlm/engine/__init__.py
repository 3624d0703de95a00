"""The engine core: requests in, scheduled steps on a backend, per-request outputs out.

``llm_engine`` (the step loop), ``scheduler`` (which tokens run next under a token budget),
``block_manager`` (paged KV blocks and the prefix cache), ``sequence`` (one sample's state),
``model_runner`` (a batch as device tensors, the forward and the sampler). Behind messages
(``messages``): ``core`` (EngineCore), ``core_process`` (its own process) and the clients the
API side uses (``client``, ``client_inproc``, ``client_mp``, ``client_outputs``).
"""
