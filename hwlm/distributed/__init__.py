"""Tensor parallelism on torch.distributed: the parallel group and its collectives
(``parallel_state``), how a model splits (``sharding``), the worker processes (``worker``) and
the executors that start them (``executor_mp``: spawned processes; ``executor_ray``: Ray actors).

Importing this package starts nothing: tensor_parallel_size 1 never touches it beyond the
import of ``ParallelGroup`` for type hints.
"""
