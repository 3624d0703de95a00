"""Every engine setting, declared once: the ``EngineArgs`` dataclass.

Each field's metadata holds its help text and, where needed, other names (``aliases``, Python
names: ``gpu_memory_utilization`` is also ``--gpu-memory-utilization``), allowed values
(``choices``), the wording of a computed default (``default_help``), or ``cli=False`` for a field
that is no command-line flag. Everything else is derived from the fields, so a setting added here
appears everywhere at once:

* ``add_cli_args`` / ``from_cli_args``: the ``--field-name`` flags of ``hwlm serve``,
  ``generate``, ``chat``, ``bench throughput`` and ``python -m hwlm.server``;
* ``from_kwargs``: the keywords of ``LLM(model, **kwargs)``;
* ``settings_doc``: the settings section of ``LLM``'s docstring.

The functions read the module's ``EngineArgs`` when called, so a subclass that adds fields can
stand in for it. Imports nothing heavy: the CLI imports this for every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
SCHEDULING_POLICIES = ("fcfs", "priority")
# KV-cache element types: auto (the model's dtype) or fp8 (= fp8_e4m3, float8_e4m3fn).
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3")
# Weight quantizations, applied to the float weights at load time (docs/quantization.md).
QUANTIZATIONS = ("int8", "int4", "fp8")
# How ranks 1..N-1 of tensor parallelism start (hwlm.distributed).
DISTRIBUTED_EXECUTORS = ("mp", "ray")


def _setting(
    default: Any,
    help_text: str,
    *,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    default_help: str | None = None,
    cli: bool = True,
    short: tuple[str, ...] = (),
) -> Any:
    metadata = {
        "help": help_text,
        "aliases": aliases,
        "short": short,  # single-dash flags, e.g. -tp
        "choices": choices,
        "default_help": default_help,
        "cli": cli,
    }
    return field(default=default, metadata=metadata)


@dataclass
class EngineArgs:
    """The settings an ``LLMEngine`` is built from, with vLLM's names and defaults."""

    model: str = field(
        metadata={
            "help": "a local Hugging Face folder, a hub id or a preset name (hwlm-tiny, ...)",
            "cli": False,  # each command takes it its own way (a positional MODEL, --model)
        }
    )
    device: str = _setting("auto", "cpu, cuda, rocm, a plugin name, or auto (the best available)")
    dtype: str = _setting(
        "auto",
        "weights and activations: auto (the model's, if the device supports it), float32, "
        "float16 or bfloat16",
    )
    seed: int = _setting(0, "random seed")
    data_parallel_size: int = _setting(
        1,
        "hwlm serve only: engine cores, each a whole engine on its own devices (GPU i, or its "
        "share of the CPU cores), between which the API server balances requests",
    )
    max_model_len: int | None = _setting(
        None,
        "context length, prompt plus output, in tokens; above the model's limit only with "
        "HWLM_ALLOW_LONG_MAX_MODEL_LEN=1",
        default_help="the model's max_position_embeddings",
    )
    max_num_seqs: int = _setting(256, "most sequences in one batch")
    scheduling_policy: str = _setting(
        "fcfs",
        "which waiting request runs first: fcfs (arrival order) or priority (a request's "
        "priority, lower first, then arrival; the lowest is preempted first)",
        choices=SCHEDULING_POLICIES,
    )
    max_request_share: float = _setting(
        0.5,
        "the most of max_num_seqs one request (all its prompts and samples) may hold while "
        "other requests wait; 1 turns the limit off",
    )
    max_num_batched_tokens: int | None = _setting(
        None,
        "token budget of one step; longer prompts are prefilled in chunks",
        default_help="8192, 16384 for LLM on a GPU; at least max_num_seqs",
    )
    block_size: int = _setting(16, "tokens per KV-cache block")
    enable_prefix_caching: bool = _setting(True, "reuse the KV blocks of shared prompt prefixes")
    memory_utilization: float = _setting(
        0.9,
        "fraction of device memory (of HWLM_CPU_KVCACHE_SPACE on the CPU) for weights and KV cache",
        aliases=("gpu_memory_utilization",),
    )
    num_kv_blocks: int | None = _setting(
        None,
        "KV-cache blocks to allocate, overriding memory_utilization",
        default_help="as many as the memory budget holds",
    )
    load_format: str = _setting(
        "auto",
        "weights format; dummy: random weights from the model's config",
        choices=LOAD_FORMATS,
    )
    quantization: str | None = _setting(
        None,
        "quantize the dense layers' weights at load time: int8 or int4 (cpu: ONNX Runtime, "
        "pip install 'hwlm[cpu-quant]'; cuda: W4A16/W8A16 Triton kernels), fp8 (cuda: fp8 "
        "weights and per-token fp8 activations)",
        choices=QUANTIZATIONS,
        default_help="none, the model's float weights",
    )
    kv_cache_dtype: str = _setting(
        "auto",
        "KV-cache element type: auto (the model's dtype), bfloat16 (half the bytes of a float32 "
        "model's cache; cpu backend) or fp8 (float8 e4m3 with a per-layer scale, 1.0 unless the "
        "checkpoint has one: half the bytes of bf16; cuda backend)",
        choices=KV_CACHE_DTYPES,
    )
    tensor_parallel_size: int = _setting(
        1,
        "split the model over this many devices (or CPU processes): each rank holds its share "
        "of the heads and of the MLP; 1 runs in the engine process alone",
        short=("-tp",),
    )
    distributed_executor_backend: str = _setting(
        "mp",
        "how ranks 1..N-1 of tensor parallelism start: mp (processes on this host) or ray (Ray "
        "actors, across machines; pip install 'hwlm[distributed]')",
        choices=DISTRIBUTED_EXECUTORS,
    )
    tokenizer: str | None = _setting(None, "tokenizer folder or hub id", default_help="the model's")
    enforce_eager: bool = _setting(
        False, "never capture CUDA graphs (decode steps run eagerly, as prefills do)"
    )
    max_logprobs: int = _setting(
        20,
        "the most logprobs a request may ask for (logprobs, top_logprobs, prompt_logprobs); "
        "-1: no limit",
    )
    async_scheduling: bool | None = _setting(
        None,
        "schedule and launch the next step while the device runs this one",
        default_help="on for GPUs, off on the CPU",
    )
    offline: bool = _setting(
        False,
        "offline batches (LLM sets it): a GPU's default token budget is 16384 rather than 8192",
        cli=False,
    )


def arg_default(name: str) -> Any:
    """The default of the ``EngineArgs`` field ``name`` (for configs that mirror a setting)."""
    return next(f.default for f in dataclasses.fields(EngineArgs) if f.name == name)


def cli_fields() -> list[dataclasses.Field[Any]]:
    """The fields that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(EngineArgs) if f.metadata.get("cli", True)]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_cli_args(
    parser: argparse.ArgumentParser, overrides: Mapping[str, tuple[Any, str]] | None = None
) -> None:
    """Add a flag per CLI field to an "engine" group of ``parser``. ``overrides`` maps a field
    to (default, wording of that default) for a command with defaults of its own."""
    hints = typing.get_type_hints(EngineArgs)
    group = parser.add_argument_group("engine (the settings of LLM(...) too)")
    for f in cli_fields():
        default, default_text = (overrides or {}).get(f.name, (f.default, _default_text(f)))
        names = [flag_name(n) for n in (f.name, *f.metadata.get("aliases", ()))]
        names += f.metadata.get("short", ())
        help_text = f"{f.metadata['help']} (default: {default_text})".replace("%", "%%")
        kind = _value_type(hints[f.name])
        if kind is bool:
            group.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
        else:
            group.add_argument(
                *names,
                dest=f.name,
                type=kind,
                default=default,
                choices=f.metadata.get("choices"),
                help=help_text,
            )


def cli_kwargs(namespace: argparse.Namespace) -> dict[str, Any]:
    """The CLI fields' values from parsed arguments (``add_cli_args``'s flags)."""
    return {f.name: getattr(namespace, f.name) for f in cli_fields()}


def from_cli_args(namespace: argparse.Namespace) -> EngineArgs:
    """EngineArgs from parsed arguments: ``namespace.model`` and the CLI fields."""
    return EngineArgs(model=namespace.model, **cli_kwargs(namespace))


def keyword_names() -> list[str]:
    """Every keyword ``from_kwargs`` takes besides ``model``: field names and their aliases."""
    names = []
    for f in dataclasses.fields(EngineArgs):
        if f.name != "model":
            names += [f.name, *f.metadata.get("aliases", ())]
    return names


def from_kwargs(model: str, kwargs: Mapping[str, Any]) -> EngineArgs:
    """EngineArgs for ``LLM(model, **kwargs)``. An alias stands for its field (both given must
    agree: ValueError); an unknown keyword is a TypeError naming it and the valid ones."""
    values = dict(kwargs)
    unknown = sorted(set(values) - set(keyword_names()))
    if unknown:
        valid = ", ".join(sorted(keyword_names()))
        raise TypeError(f"unknown engine setting {unknown[0]!r}; the settings are: {valid}")
    for f in dataclasses.fields(EngineArgs):
        for alias in f.metadata.get("aliases", ()):
            if alias not in values:
                continue
            value = values.pop(alias)
            if values.get(f.name, value) != value:
                raise ValueError(f"{f.name} and {alias} disagree; give one")
            values[f.name] = value
    return EngineArgs(model=model, **values)


def settings_doc(indent: str = "    ", defaults: Mapping[str, Any] | None = None) -> str:
    """One entry per setting (name, aliases, default, help), for docstrings; ``defaults``
    overrides the defaults shown, for a caller with defaults of its own."""
    entries = []
    for f in dataclasses.fields(EngineArgs):
        if f.name == "model":
            continue
        names = " / ".join(f"``{n}``" for n in (f.name, *f.metadata.get("aliases", ())))
        if defaults and f.name in defaults:
            default = repr(defaults[f.name])
        else:
            default = f.metadata.get("default_help") or repr(f.default)
        entry = f"{names} (default: {default}): {f.metadata['help']}."
        entries.append(
            textwrap.fill(entry, 96, initial_indent=indent + "- ", subsequent_indent=indent + "  ")
        )
    return "\n".join(entries)


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.metadata.get("default_help"):
        return str(f.metadata["default_help"])
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


def _value_type(hint: Any) -> type:
    """The type a flag converts to: ``int`` for ``int | None``, and so on."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if not isinstance(hint, type):
        raise TypeError(f"EngineArgs fields need a plain type, got {hint!r}")
    return hint
