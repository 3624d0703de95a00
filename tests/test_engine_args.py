"""One source of truth for engine settings: every ``EngineArgs`` field is a flag of each command
that builds an engine and a keyword of ``LLM``; ``--max-logprobs`` reaches the server's checks;
``max_model_len`` above the model's limit is an error unless allowed; ``hwlm serve`` on a busy
port fails before loading a model."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from hwlm import engine_args
from hwlm.cli.main import build_parser, main
from hwlm.config import ModelConfig, resolve_max_model_len
from hwlm.engine_args import EngineArgs, cli_fields, flag_name, from_cli_args

HELP_COMMANDS = [["serve"], ["generate"], ["chat"], ["bench", "throughput"]]


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


class _Recorder:
    """Stands in for LLMEngine: keeps the EngineArgs it was built from."""

    built: list[EngineArgs] = []

    def __init__(self, args: EngineArgs) -> None:
        self.built.append(args)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EngineArgs]]:
    import hwlm.llm

    built: list[EngineArgs] = []
    monkeypatch.setattr(_Recorder, "built", built)
    monkeypatch.setattr(hwlm.llm, "LLMEngine", _Recorder)
    yield built


def _sample_value(f: dataclasses.Field[Any]) -> Any:
    """A value other than the field's default, of its type."""
    kind = engine_args._value_type(_hints()[f.name])
    if kind is bool:
        return not f.default
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != f.default)
    return {int: 7, float: 0.25, str: "x"}[kind]


def _hints() -> dict[str, Any]:
    import typing

    return typing.get_type_hints(engine_args.EngineArgs)


# Every setting everywhere ------------------------------------------------------------------------


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_every_cli_field_is_a_flag_of_each_command(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(command, capsys)
    missing = [f.name for f in cli_fields() if flag_name(f.name) not in text]
    assert not missing, f"{' '.join(command)} --help lacks {missing}"


def test_python_m_hwlm_server_has_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from hwlm.server.__main__ import main as server_main

    with pytest.raises(SystemExit):
        server_main(["--help"])
    text = capsys.readouterr().out
    assert not [f.name for f in cli_fields() if flag_name(f.name) not in text]


def test_every_field_is_an_llm_keyword(recorded: list[EngineArgs]) -> None:
    from hwlm import LLM

    for f in dataclasses.fields(EngineArgs):
        if f.name == "model":
            continue
        value = _sample_value(f)
        if f.name == "data_parallel_size":  # hwlm serve only: LLM refuses N > 1
            value = 1
        LLM("some-model", **{f.name: value})
        assert getattr(recorded[-1], f.name) == value, f.name
        assert recorded[-1].model == "some-model"
        assert f"``{f.name}``" in (LLM.__doc__ or ""), f"LLM's docstring lacks {f.name}"


def test_every_cli_flag_reaches_engine_args() -> None:
    argv = ["serve", "m"]
    expected = {}
    for f in cli_fields():
        value = _sample_value(f)
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + flag_name(f.name)[2:])
        else:
            argv += [flag_name(f.name), str(value)]
        expected[f.name] = value
    args = from_cli_args(build_parser().parse_args(argv))
    assert args.model == "m"
    assert {name: getattr(args, name) for name in expected} == expected


def test_llm_rejects_an_unknown_keyword_by_name(recorded: list[EngineArgs]) -> None:
    from hwlm import LLM

    with pytest.raises(TypeError, match=r"'max_len'.*max_model_len"):
        LLM("m", max_len=5)
    assert not recorded


def test_gpu_memory_utilization_is_an_alias(recorded: list[EngineArgs]) -> None:
    from hwlm import LLM

    LLM("m", gpu_memory_utilization=0.5)
    assert recorded[-1].memory_utilization == 0.5
    args = build_parser().parse_args(["serve", "--gpu-memory-utilization", "0.3"])
    assert from_cli_args(args).memory_utilization == 0.3


def test_llm_batches_are_offline_unless_told(recorded: list[EngineArgs]) -> None:
    from hwlm import LLM

    LLM("m")
    LLM("m", offline=False)
    assert [a.offline for a in recorded] == [True, False]


@dataclass
class _Extended(EngineArgs):
    extra_knob: int = field(default=3, metadata={"help": "a setting added later"})


def test_a_new_field_appears_everywhere_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], recorded: list[Any]
) -> None:
    from hwlm import LLM

    monkeypatch.setattr(engine_args, "EngineArgs", _Extended)
    for command in HELP_COMMANDS:
        assert "--extra-knob" in _help(command, capsys), command
    args = from_cli_args(build_parser().parse_args(["serve", "--extra-knob", "9"]))
    assert isinstance(args, _Extended) and args.extra_knob == 9
    LLM("m", extra_knob=5)
    assert recorded[-1].extra_knob == 5
    assert "``extra_knob``" in engine_args.settings_doc()


def test_bench_keeps_its_workload_defaults() -> None:
    args = build_parser().parse_args(["bench", "throughput"])
    assert (args.max_model_len, args.load_format, args.tokenizer) == (None, None, None)
    assert args.max_num_seqs == engine_args.arg_default("max_num_seqs")
    args = build_parser().parse_args(["bench", "throughput", "--max-model-len", "77"])
    assert args.max_model_len == 77


# --max-logprobs through the server ---------------------------------------------------------------

LIMIT = 50
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def app(device: str) -> Iterator[Any]:
    pytest.importorskip("fastapi")
    from hwlm.engine.llm_engine import LLMEngine
    from hwlm.server.api import build_app
    from hwlm.server.async_engine import AsyncLLMEngine

    argv = ["serve", "hwlm-tiny", "--device", device, "--max-logprobs", str(LIMIT)]
    argv += ["--max-model-len", "128", "--num-kv-blocks", "32"]
    engine = AsyncLLMEngine(LLMEngine(from_cli_args(build_parser().parse_args(argv))))
    try:
        yield build_app(engine, "hwlm-tiny", None)
    finally:
        engine.shutdown()


def _post(app: Any, path: str, body: dict[str, Any]) -> Any:
    httpx = pytest.importorskip("httpx")

    async def call() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, json=body, timeout=60)

    return asyncio.run(call())


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": "N"}, "logprobs"),
        ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": "N"}, "top_logprobs"),
        ("/v1/completions", {"prompt": "hi", "prompt_logprobs": "N"}, "prompt_logprobs"),
        ("/v1/chat/completions", {"messages": USER, "prompt_logprobs": "N"}, "prompt_logprobs"),
    ],
)  # fmt: skip
def test_max_logprobs_flag_sets_the_servers_limit(
    app: Any, path: str, body: dict[str, Any], param: str
) -> None:
    def ask(n: int) -> Any:
        filled = {k: (n if v == "N" else v) for k, v in body.items()}
        return _post(app, path, {**filled, "max_tokens": 2})

    ok = ask(LIMIT)
    assert ok.status_code == 200, ok.text
    choice = ok.json()["choices"][0]
    if param == "logprobs":  # keyed by text: tokens that decode alike share an entry
        assert all(len(t) > 20 for t in choice["logprobs"]["top_logprobs"])
    elif param == "top_logprobs":
        assert all(len(t["top_logprobs"]) == LIMIT for t in choice["logprobs"]["content"])
    over = ask(LIMIT + 1)
    assert over.status_code == 400, over.text
    error = over.json()["error"]
    assert error["param"] == param and str(LIMIT) in error["message"]


def test_max_logprobs_minus_one_is_no_limit() -> None:
    pytest.importorskip("fastapi")
    from hwlm.server.common import check_logprobs
    from hwlm.server.errors import APIError

    check_logprobs(5000, "logprobs", -1)
    check_logprobs(-1, "prompt_logprobs", -1, whole_vocab_ok=True)
    for value, param, limit in [(-1, "logprobs", -1), (-1, "prompt_logprobs", 20), (21, "x", 20)]:
        with pytest.raises(APIError) as info:
            check_logprobs(value, param, limit, whole_vocab_ok=param == "prompt_logprobs")
        assert info.value.param == param


# max_model_len against the model's limit ---------------------------------------------------------


def _model(max_positions: int, rope_scaling: dict[str, Any] | None = None) -> ModelConfig:
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 64,
        "max_position_embeddings": max_positions,
    }
    if rope_scaling is not None:
        hf["rope_scaling"] = rope_scaling
    return ModelConfig.from_hf_dict(hf)


def test_max_model_len_above_the_models_limit_is_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("HWLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    model = _model(256)
    assert resolve_max_model_len(None, model) == 256
    assert resolve_max_model_len(200, model) == 200
    with pytest.raises(ValueError, match=r"max_model_len 300 .* limit of 256 tokens") as info:
        resolve_max_model_len(300, model)
    assert "\n" not in str(info.value) and "HWLM_ALLOW_LONG_MAX_MODEL_LEN=1" in str(info.value)
    monkeypatch.setenv("HWLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with caplog.at_level(logging.WARNING, logger="hwlm.config"):
        assert resolve_max_model_len(300, model) == 300
    assert "300" in caplog.text and "256" in caplog.text


@pytest.mark.parametrize(
    "scaling,limit",
    [
        ({"rope_type": "linear", "factor": 2.0}, 512),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 512),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 256),
    ],
)  # fmt: skip
def test_rope_scaling_stretches_the_limit(
    scaling: dict[str, Any], limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HWLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    model = _model(256, scaling)
    assert resolve_max_model_len(limit, model) == limit
    with pytest.raises(ValueError, match=f"limit of {limit} tokens"):
        resolve_max_model_len(limit + 1, model)


def test_cli_reports_a_too_long_max_model_len_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HWLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    argv = ["generate", "hwlm-tiny", "--prompt", "hi", "--max-model-len", "4096", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_model_len 4096" in err[0] and "2048" in err[0], err


def test_env_var_allows_a_long_max_model_len(
    device: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from hwlm import LLM

    monkeypatch.setenv("HWLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with caplog.at_level(logging.WARNING, logger="hwlm.config"):
        llm = LLM("hwlm-tiny", device=device, max_model_len=4096, num_kv_blocks=16)
    assert llm.engine.config.max_model_len == 4096
    assert "HWLM_ALLOW_LONG_MAX_MODEL_LEN" in caplog.text


# hwlm serve on a busy port ------------------------------------------------------------------------


def test_serve_on_a_busy_port_fails_before_loading_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import hwlm.engine.llm_engine

    def no_load(args: EngineArgs) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(hwlm.engine.llm_engine, "LLMEngine", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--host", "127.0.0.1", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0], err
