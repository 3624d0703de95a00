"""``hwlm --help`` and each subcommand's help: complete, and serve's flags named as vLLM names
them."""

from __future__ import annotations

import argparse
import io
import itertools
from collections.abc import Generator

import pytest

from hwlm.cli.chat import INTERRUPTED, chat_loop
from hwlm.cli.chat_backends import ChatSettings, LocalChat
from hwlm.cli.main import build_parser, main

SUBCOMMANDS = [
    ["devices"], ["generate"], ["serve"], ["chat"], ["bench"], ["bench", "throughput"],
    ["bench", "serve"],
]  # fmt: skip
NOT_CHECKED: set[tuple[str, ...]] = set()


def _subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=" ".join)
def test_help_renders_and_every_flag_is_explained(
    path: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hwlm" in capsys.readouterr().out
    if tuple(path) in NOT_CHECKED:
        return
    missing = [
        a.option_strings or a.dest
        for a in _subparser(path)._actions
        if not a.help and not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]
    assert not missing, f"flags without help: {missing}"


def test_serve_flags_are_vllms() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("localhost", 8000, "hwlm-tiny")
    argv = [
        "serve", "m", "--api-key", "k", "--served-model-name", "s", "--max-model-len", "64",
        "--max-num-seqs", "4", "--max-num-batched-tokens", "128", "--block-size", "8",
        "--dtype", "float32", "--no-enable-prefix-caching", "--memory-utilization", "0.5",
        "--num-kv-blocks", "10", "--chat-template", "{{ x }}", "--seed", "3",
        "--load-format", "dummy", "--log-level", "debug",
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    assert (args.api_key, args.served_model_name, args.max_model_len) == ("k", "s", 64)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.block_size) == (4, 128, 8)
    assert (args.dtype, args.enable_prefix_caching, args.memory_utilization) == (
        "float32",
        False,
        0.5,
    )
    assert (args.num_kv_blocks, args.chat_template, args.seed) == (10, "{{ x }}", 3)
    assert (args.load_format, args.log_level) == ("dummy", "debug")
    assert build_parser().parse_args(["--log-level", "error", "serve"]).log_level == "error"


def test_chat_reads_piped_stdin_and_keeps_the_conversation() -> None:
    class Echo:
        def __init__(self) -> None:
            self.seen: list[list[dict[str, str]]] = []

        def stream_reply(self, messages: list[dict[str, str]]):  # type: ignore[no-untyped-def]
            self.seen.append(list(messages))
            yield "re: "
            yield messages[-1]["content"]

    backend, out = Echo(), io.StringIO()
    code = chat_loop(backend, io.StringIO("hello\n\nsecond\n/clear\nthird\n"), out, "be brief")
    assert code == 0
    assert out.getvalue() == "re: hello\nre: second\nre: third\n"
    assert [m["role"] for m in backend.seen[1]] == ["system", "user", "assistant", "user"]
    assert backend.seen[2] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "third"},
    ]


def _stdin_then_ctrl_c(lines: str, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Piped ``lines``, then Ctrl-C at the prompt."""
    stdin = io.StringIO(lines)
    read = stdin.readline

    def readline(size: int = -1) -> str:
        line = read(size)
        if not line:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr(stdin, "readline", readline)
    return stdin


class _Interrupted:
    """A reply of three pieces; with ``cut``, Ctrl-C cuts the first reply after its first piece
    (raised inside the stream, as when the engine is mid-step). Counts the streams closed."""

    def __init__(self, cut: bool = True) -> None:
        self.cut = cut
        self.seen: list[list[dict[str, str]]] = []
        self.closed = 0

    def stream_reply(self, messages: list[dict[str, str]]) -> Generator[str, None, None]:
        self.seen.append(list(messages))
        try:
            yield "one "
            if self.cut and len(self.seen) == 1:
                raise KeyboardInterrupt
            yield "two "
            yield "three"
        finally:
            self.closed += 1


def test_chat_ctrl_c_stops_the_reply_and_returns_to_the_prompt() -> None:
    backend, out = _Interrupted(), io.StringIO()
    code = chat_loop(backend, io.StringIO("first\nsecond\n"), out, None)
    assert code == 0
    assert out.getvalue() == "one \none two three\n"
    assert backend.closed == 2
    assert backend.seen[1][:2] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one "},  # the part shown stays in the conversation
    ]


def test_chat_ctrl_c_while_writing_closes_the_stream() -> None:
    class Terminal(io.StringIO):
        def write(self, text: str) -> int:
            if text == "two ":
                raise KeyboardInterrupt
            return super().write(text)

    backend, out = _Interrupted(cut=False), Terminal()
    assert chat_loop(backend, io.StringIO("hi\n"), out, None) == 0
    assert out.getvalue() == "one \n"
    assert backend.closed == 1


def test_chat_ctrl_c_at_the_prompt_ends_the_session_with_130(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, out = _Interrupted(), io.StringIO()
    stdin = _stdin_then_ctrl_c("/clear\n", monkeypatch)
    assert chat_loop(backend, stdin, out, None) == INTERRUPTED == 130
    assert out.getvalue() == "\n"


def test_local_chat_ctrl_c_mid_reply_ends_the_request(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hwlm import LLM, SamplingParams
    from hwlm.outputs import RequestOutput

    llm = LLM("hwlm-tiny", device=device, max_model_len=128, num_kv_blocks=32)
    messages = [{"role": "user", "content": "Hello!"}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    free = llm.engine.block_manager.num_free_blocks
    real_step, calls = llm.engine.step, itertools.count()

    def step() -> list[RequestOutput]:
        if next(calls) == 1:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step)
    chat, out = LocalChat(llm.engine, ChatSettings(max_tokens=6, temperature=0.0)), io.StringIO()
    assert chat_loop(chat, io.StringIO("Hello!\n/clear\nHello!\n"), out, None) == 0
    assert out.getvalue().endswith("\n" + expected[0].outputs[0].text + "\n")
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == free


def test_local_chat_streams_the_greedy_reply(device: str) -> None:
    from hwlm import LLM, SamplingParams

    llm = LLM("hwlm-tiny", device=device, max_model_len=128, num_kv_blocks=32)
    messages = [{"role": "user", "content": "Hello!"}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    chat = LocalChat(llm.engine, ChatSettings(max_tokens=6, temperature=0.0))
    assert "".join(chat.stream_reply(messages)) == expected[0].outputs[0].text


def test_the_command_line_needs_no_web_framework() -> None:
    """The GPU machines lack fastapi/uvicorn: hwlm's CLI (chat included) must import without."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fastapi", "uvicorn", "starlette", "httpx", "openai"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import hwlm, hwlm.engine.llm_engine, hwlm.server, hwlm.cli.chat, hwlm.server.chat_template
from hwlm.cli.main import build_parser
build_parser().parse_args(["chat", "--url", "http://x"])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
