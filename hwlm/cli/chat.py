"""``hwlm chat``: talk to a model, line by line, from a terminal or a pipe.

Each line of standard input is a user message; the reply streams to standard output and the
conversation goes on (``/clear`` forgets it, ``/exit`` or end of input (Ctrl-D) ends the session).
Ctrl-C during a reply stops the reply (the part shown stays in the conversation); Ctrl-C at the
prompt ends the session (exit status 130). Without ``--url`` the model is loaded in this process;
with it, an OpenAI-compatible server answers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from hwlm.cli.chat_backends import ChatBackend, ChatSettings, Message, RemoteChat, RemoteChatError

API_KEY_ENV = "HWLM_API_KEY"
INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


def add_chat_parser(
    subparsers: Any,
    add_engine_arguments: Callable[[argparse.ArgumentParser], None],
    engine_kwargs: Callable[[argparse.Namespace], dict[str, Any]],
) -> argparse.ArgumentParser:
    chat: argparse.ArgumentParser = subparsers.add_parser(
        "chat",
        help="chat with a model (loaded here, or a server given by --url); reads stdin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model to load (default: hwlm-tiny), or with --url the served model's name "
        "(default: the first one the server lists)",
    )
    chat.add_argument(
        "--url", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000"
    )
    chat.add_argument(
        "--api-key", default=None, help=f"the server's API key (default: ${API_KEY_ENV})"
    )
    chat.add_argument("--system", default=None, help="a system prompt opening the conversation")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest reply (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="(default: 0.7)")
    chat.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    chat.add_argument(
        "--chat-template", default=None, help="a Jinja chat template (file or inline), local only"
    )
    add_engine_arguments(chat)
    chat.set_defaults(func=lambda args: run_chat_command(args, engine_kwargs(args)))
    return chat


def run_chat_command(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    settings = ChatSettings(args.max_tokens, args.temperature, args.top_p)
    try:
        backend = _backend(args, engine_kwargs, settings)
        return chat_loop(backend, sys.stdin, sys.stdout, args.system)
    except RemoteChatError as exc:
        print(f"hwlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while the model loads or the server is asked for its models
        print(file=sys.stderr)
        return INTERRUPTED


def _backend(
    args: argparse.Namespace, engine_kwargs: dict[str, Any], settings: ChatSettings
) -> ChatBackend:
    if args.url:
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        return RemoteChat(args.url, args.model, api_key, settings)
    from hwlm.cli.chat_backends import LocalChat
    from hwlm.engine.llm_engine import LLMEngine
    from hwlm.engine_args import EngineArgs
    from hwlm.server.chat_template import load_chat_template

    engine = LLMEngine(EngineArgs(model=args.model or "hwlm-tiny", **engine_kwargs))
    return LocalChat(engine, settings, load_chat_template(args.chat_template))


def chat_loop(backend: ChatBackend, stdin: TextIO, stdout: TextIO, system: str | None) -> int:
    """Read user lines until end of input; stream each reply. Prompts only on a terminal.

    Returns 0 at end of input or ``/exit``, ``INTERRUPTED`` on Ctrl-C at the prompt; Ctrl-C
    during a reply ends only that reply."""
    interactive = stdin.isatty()
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    start = len(history)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            return INTERRUPTED
        if not line:
            if interactive:  # Ctrl-D: end the prompt's line
                stdout.write("\n")
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            del history[start:]
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": _write_reply(backend, history, stdout)})


def _write_reply(backend: ChatBackend, history: list[Message], stdout: TextIO) -> str:
    """Stream the reply to ``history`` to ``stdout`` and return it; Ctrl-C stops it there (the
    backend's stream is closed, which ends the request) and returns what was written."""
    reply: list[str] = []
    stream = backend.stream_reply(history)
    try:
        for piece in stream:
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    stdout.write("\n")
    stdout.flush()
    return "".join(reply)
