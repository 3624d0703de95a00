"""``hwlm chat``: talk to a model, line by line, from a terminal or a pipe.

Each line of standard input is a user message; the reply streams to standard output and the
conversation goes on (``/clear`` forgets it, ``/exit`` or end of input ends the session). Without
``--url`` the model is loaded in this process; with it, an OpenAI-compatible server answers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from hwlm.cli.chat_backends import ChatBackend, ChatSettings, Message, RemoteChat, RemoteChatError

API_KEY_ENV = "HWLM_API_KEY"


def add_chat_parser(
    subparsers: Any,
    add_engine_arguments: Callable[[argparse.ArgumentParser], None],
    engine_kwargs: Callable[[argparse.Namespace], dict[str, Any]],
) -> argparse.ArgumentParser:
    chat = subparsers.add_parser(
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


def _backend(
    args: argparse.Namespace, engine_kwargs: dict[str, Any], settings: ChatSettings
) -> ChatBackend:
    if args.url:
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        return RemoteChat(args.url, args.model, api_key, settings)
    from hwlm.cli.chat_backends import LocalChat
    from hwlm.engine.llm_engine import EngineArgs, LLMEngine
    from hwlm.server.chat_template import load_chat_template

    engine = LLMEngine(EngineArgs(model=args.model or "hwlm-tiny", **engine_kwargs))
    return LocalChat(engine, settings, load_chat_template(args.chat_template))


def chat_loop(backend: ChatBackend, stdin: TextIO, stdout: TextIO, system: str | None) -> int:
    """Read user lines until end of input; stream each reply. Prompts only on a terminal."""
    interactive = stdin.isatty()
    history: list[Message] = [{"role": "system", "content": system}] if system else []
    start = len(history)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
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
        reply = []
        for piece in backend.stream_reply(history):
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
