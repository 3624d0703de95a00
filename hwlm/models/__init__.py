"""Model implementations and the interface the engine drives them through."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from hwlm.attention import ForwardContext
from hwlm.backend import Backend
from hwlm.config import ModelConfig
from hwlm.distributed.parallel_state import ParallelGroup
from hwlm.models.layers import Embedding, Linear, LinearKernel, ParallelLayer


class CausalLM(nn.Module):
    """A decoder-only language model over a flattened batch and a paged KV cache.

    Subclasses name their modules as the Hugging Face checkpoints do, except that some
    projections are fused (``packed_modules``), so ``load_weights`` maps names generically.
    """

    config: ModelConfig
    # Checkpoint name fragment -> (fused module name fragment, shard index in it).
    packed_modules: ClassVar[dict[str, tuple[str, int]]] = {}
    # Prefix of the base model's parameters; checkpoints of the bare base model lack it.
    base_prefix: ClassVar[str] = "model."

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: int64 [num_tokens] (flattened batch).
        Returns hidden states [num_tokens, hidden]."""
        raise NotImplementedError

    lm_head: Linear | Embedding
    # Set by a backend's prepare_model: the LM-head product from repacked weights.
    logits_kernel: LinearKernel | None = None
    # The tensor-parallel group this model is a shard of; None: the whole model (no group).
    parallel: ParallelGroup | None = None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab_size]. A tensor-parallel shard computes its
        slice of the vocabulary and gathers the others' (every rank must call it)."""
        if self.logits_kernel is not None:
            logits = self.logits_kernel(hidden).float()
        else:
            logits = torch.nn.functional.linear(hidden, self.lm_head.weight).float()
        if self.parallel is not None:
            return self.parallel.all_gather(logits)[:, : self.config.vocab_size]
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the parameters, converting dtype.

        Raises ValueError on a shape mismatch, on unknown names, or when parameters are left
        unset. Rotary ``inv_freq`` buffers, and ``lm_head.weight`` of a tied model, are skipped.
        """
        params = dict(self.named_parameters())
        expected = {(name, shard) for name in params for shard in self._shards(name)}
        loaded: set[tuple[str, int | None]] = set()
        unexpected: list[str] = []
        for ckpt_name, tensor in weights:
            name = self._param_name(ckpt_name)
            if name is None:
                continue
            shard = None
            for src, (dst, idx) in self.packed_modules.items():
                if src in name:
                    name, shard = name.replace(src, dst), idx
                    break
            param = params.get(name)
            if param is None or (name, shard) not in expected:
                unexpected.append(ckpt_name)
                continue
            target = param.data
            if shard is not None:
                sizes = self._fused_module(name).output_sizes
                target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
            if self.parallel is not None:
                tensor = self._rank_slice(name, tensor, shard)
            if target.shape != tensor.shape:
                raise ValueError(
                    f"weight {ckpt_name!r} has shape {tuple(tensor.shape)} in the checkpoint but "
                    f"{tuple(target.shape)} in the model; does config.json match the weights?"
                )
            target.copy_(tensor)
            loaded.add((name, shard))
        missing = sorted({name for name, _ in expected - loaded})
        if unexpected or missing:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} weights ({_few(missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} unknown weights ({_few(unexpected)})")
            raise ValueError(
                f"checkpoint does not match {self.config.architecture}: " + "; ".join(parts)
            )

    def _rank_slice(self, param_name: str, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        """The part of a checkpoint tensor this tensor-parallel rank keeps (each rank reads the
        whole checkpoint and slices it here)."""
        module_name, _, attr = param_name.rpartition(".")
        module = self.get_submodule(module_name)
        if isinstance(module, ParallelLayer):
            return module.checkpoint_slice(attr, tensor, shard)
        return tensor  # replicated: norms, position embeddings, OPT's projections

    def _fused_module(self, param_name: str) -> Linear:
        module = self.get_submodule(param_name.rpartition(".")[0])
        assert isinstance(module, Linear)
        return module

    def _shards(self, param_name: str) -> list[int | None]:
        module = self.get_submodule(param_name.rpartition(".")[0])
        if isinstance(module, Linear) and module.kernel is not None:
            return []  # loaded from a pre-quantized checkpoint (hwlm.models.checkpoints)
        if isinstance(module, Linear) and len(module.output_sizes) > 1:
            return list(range(len(module.output_sizes)))
        return [None]

    def _param_name(self, ckpt_name: str) -> str | None:
        """The parameter a checkpoint tensor belongs to (before unfusing), None to skip it."""
        if ckpt_name.endswith("rotary_emb.inv_freq"):
            return None
        if ckpt_name.startswith("lm_head."):
            return None if self.config.tie_word_embeddings else ckpt_name
        if not ckpt_name.startswith(self.base_prefix):
            return self.base_prefix + ckpt_name
        return ckpt_name


def _few(names: list[str], n: int = 4) -> str:
    more = f", ... {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def build_model(
    config: ModelConfig,
    backend: Backend,
    dtype: torch.dtype,
    parallel: ParallelGroup | None = None,
) -> CausalLM:
    """An uninitialised model of ``config.family`` with parameters of ``dtype`` on the
    backend's device (fill it with ``load_weights`` or ``hwlm.models.loader``); with a
    ``parallel`` group of several ranks, this rank's shard of it."""
    from hwlm.models.llama import LlamaForCausalLM
    from hwlm.models.opt import OPTForCausalLM

    families: dict[str, type[CausalLM]] = {
        "llama": LlamaForCausalLM,
        "qwen2": LlamaForCausalLM,
        "qwen3": LlamaForCausalLM,
        "opt": OPTForCausalLM,
    }
    if config.family not in families:
        raise ValueError(f"no implementation for model family {config.family!r}")
    if parallel is not None and parallel.size == 1:
        parallel = None
    with torch.device(backend.device):
        if parallel is None:
            return families[config.family](config, dtype)
        return families[config.family](config, dtype, parallel)


__all__ = ["CausalLM", "build_model"]
