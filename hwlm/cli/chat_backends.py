"""Where ``hwlm chat`` gets its replies: a model loaded in this process, or a running server.

Both stream a reply to a conversation as text pieces. The remote one speaks the OpenAI chat API
(``POST /v1/chat/completions`` with ``stream: true``) through the standard library only, so it
works against hwlm, vLLM or any compatible server without extra packages.
"""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, str]


@dataclass(frozen=True)
class ChatSettings:
    max_tokens: int | None = 256
    temperature: float = 0.7
    top_p: float = 1.0


class ChatBackend(Protocol):
    def stream_reply(self, messages: list[Message]) -> Generator[str, None, None]:
        """The assistant's reply to ``messages``, piece by piece. Closing the generator early
        (or a KeyboardInterrupt inside it) ends the request."""
        ...


class LocalChat:
    """Replies from an ``LLMEngine`` driven in this thread (one request at a time)."""

    def __init__(self, engine: Any, settings: ChatSettings, chat_template: str | None = None):
        self.engine = engine
        self.settings = settings
        self.chat_template = chat_template
        self._ids = itertools.count()

    def stream_reply(self, messages: list[Message]) -> Generator[str, None, None]:
        from hwlm.sampling_params import SamplingParams

        text = self.engine.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
        )
        ids = list(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        params = SamplingParams(
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            max_tokens=self.settings.max_tokens,
        )
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, {"prompt": text, "prompt_token_ids": ids}, params, True)
        sent = ""
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    text = output.outputs[0].text
                    if text.startswith(sent) and len(text) > len(sent):
                        yield text[len(sent) :]
                        sent = text
        finally:
            self.engine.abort_request(request_id)  # a no-op once finished


class RemoteChatError(RuntimeError):
    """The server answered with an error (its message), or could not be reached."""


class RemoteChat:
    """Replies from an OpenAI-compatible server at ``url`` (e.g. http://localhost:8000)."""

    def __init__(
        self, url: str, model: str | None, api_key: str | None, settings: ChatSettings
    ) -> None:
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key = api_key
        self.settings = settings
        self.model = model or self._first_model()

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as exc:
            raise RemoteChatError(_error_message(exc)) from exc
        except urllib.error.URLError as exc:
            raise RemoteChatError(f"cannot reach {self.base}: {exc.reason}") from exc

    def _first_model(self) -> str:
        with self._request("/models") as response:
            models = json.load(response)["data"]
        if not models:
            raise RemoteChatError(f"{self.base}/models lists no model")
        return str(models[0]["id"])

    def stream_reply(self, messages: list[Message]) -> Generator[str, None, None]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "temperature": self.settings.temperature,
            "top_p": self.settings.top_p,
        }
        if self.settings.max_tokens is not None:
            body["max_tokens"] = self.settings.max_tokens
        with self._request("/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise RemoteChatError(event["error"].get("message", "error"))
                for choice in event.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        yield content


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        return f"{exc.code}: {json.load(exc)['error']['message']}"
    except Exception:
        return f"{exc.code}: {exc.reason}"
