"""The server's streaming path over the engine-core process: what each event carries.

``ProcessEngineSeam`` streams a request's choices straight from its deltas (``choice_feed``:
the new text and tokens, no cumulative ``RequestOutput`` per step). These tests hold it to the
general path, ``ChoiceTracker`` over the assembler's cumulative outputs, update for update, on
random token sequences (byte-level pieces that only form a character together, special tokens,
stop strings, logprobs, several samples) read with random coalescing; then run whole requests
through the app over a scripted engine client (streamed events against the non-streamed answer,
a disconnect), and through both seams on the same real engine (hwlm-tiny, greedy): the same
streamed text, logprobs, finish reasons and usage.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from hwlm.engine.client import EngineClient
from hwlm.engine.client_outputs import RequestOutputAssembler
from hwlm.engine.messages import (
    AbortRequests,
    Accepted,
    AddRequest,
    EngineInfo,
    RequestDelta,
    SampleDelta,
    StepOutputs,
    TokenLogprobs,
)
from hwlm.presets.preset_tokenizers import tokenizer_path
from hwlm.sampling_params import SamplingParams
from hwlm.server.choice_stream import ChoiceTracker, ChoiceUpdate
from hwlm.server.engine_seam_mp import ProcessOutputStream
from hwlm.text.tokenizer import load_tokenizer

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(str(tokenizer_path("hwlm-tiny")))


# Feeds against ChoiceTracker ----------------------------------------------------------------------


def _random_tokens(rng: random.Random, count: int) -> list[int]:
    """Mostly words, with byte pieces (97..255: parts of multi-byte characters) and specials."""
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.25:
            out.append(rng.randrange(97, 256))
        elif kind < 0.3:
            out.append(rng.randrange(0, 3))
        else:
            out.append(rng.randrange(256, 1024))
    return out


def _logprobs(rng: random.Random, token_id: int, top: int) -> TokenLogprobs:
    ids = [rng.randrange(3, 1024) for _ in range(top)]
    if token_id not in ids:
        ids.append(token_id)
    return TokenLogprobs(
        ids, [-0.1 * (i + 1) for i in range(len(ids))], list(range(1, len(ids) + 1))
    )


def _deltas(
    rng: random.Random, params: SamplingParams, num_samples: int, lengths: list[int]
) -> list[RequestDelta]:
    """A request's deltas: each sample gets its tokens in random steps of 0-3 tokens, and
    finishes (by length, or on a stop string when it has one) in its last."""
    tokens = [_random_tokens(rng, n) for n in lengths]
    sent = [0] * num_samples
    deltas: list[RequestDelta] = []
    first = True
    while any(sent[i] < len(tokens[i]) for i in range(num_samples)):
        samples = []
        for i in range(num_samples):
            if sent[i] >= len(tokens[i]):
                continue
            take = min(rng.randrange(0, 4), len(tokens[i]) - sent[i])
            if take == 0 and not first:
                continue
            new = tokens[i][sent[i] : sent[i] + take]
            sent[i] += take
            last = sent[i] == len(tokens[i])
            reason: str | None = None
            stop: str | int | None = None
            if last:
                reason = "stop" if params.stop_strings and rng.random() < 0.7 else "length"
                if reason == "stop":
                    stop = rng.choice(params.stop_strings)
            lps = None
            if params.logprobs is not None:
                lps = [_logprobs(rng, t, params.logprobs) for t in new]
            samples.append(SampleDelta(i, new, -0.5 * sent[i], lps, reason, stop))
        done = all(sent[i] == len(tokens[i]) for i in range(num_samples))
        prompt_lps = None
        if first and params.prompt_logprobs is not None:
            prompt_lps = [None] + [_logprobs(rng, t, 2) for t in PROMPT[1:]]
        deltas.append(
            RequestDelta("r", samples, done, 0 if first else None, prompt_logprobs=prompt_lps)
        )
        first = False
    return deltas


class _ScriptedDeltas:
    """Stands in for a client's RequestStream: the deltas the test puts, read without waiting."""

    def __init__(self) -> None:
        self.waiting: list[RequestDelta] = []
        self.aborted = False

    def next_nowait(self) -> RequestDelta | None:
        return self.waiting.pop(0) if self.waiting else None

    async def __anext__(self) -> RequestDelta:
        raise AssertionError("the test reads only what waits")

    def abort(self) -> None:
        self.aborted = True


def _view(update: ChoiceUpdate) -> tuple[Any, ...]:
    s, e = update.start_token, update.end_token
    logprobs = None if update.logprobs is None else list(update.logprobs[s:e])
    return (
        update.index, update.prompt_index, update.delta, update.chars_before, update.first,
        list(update.token_ids[s:e]), logprobs, update.finish_reason, update.stop_reason,
        list(update.prompt_token_ids), update.prompt_logprobs,
    )  # fmt: skip


CASES = [
    pytest.param({}, 1, False, id="plain"),
    pytest.param({"logprobs": 2}, 1, True, id="logprobs"),
    pytest.param({"stop": ["ab", "the end"]}, 1, False, id="stop"),
    pytest.param({"stop": ["ab"], "include_stop_str_in_output": True}, 1, False, id="stop-incl"),
    pytest.param({"n": 3, "logprobs": 1, "prompt_logprobs": 1}, 3, True, id="n3-logprobs"),
    pytest.param({"n": 2, "stop": ["xyz"]}, 2, False, id="n2-stop"),
    pytest.param({"skip_special_tokens": False}, 1, False, id="specials"),
    pytest.param({"detokenize": False, "logprobs": 0}, 1, True, id="no-text"),
]


@pytest.mark.parametrize(("settings", "num_samples", "token_updates"), CASES)
@pytest.mark.parametrize("seed", range(6))
def test_feed_gives_the_trackers_updates(
    tokenizer: Any, settings: dict[str, Any], num_samples: int, token_updates: bool, seed: int
) -> None:
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=64, **settings)
    lengths = [rng.randrange(1, 40) for _ in range(num_samples)]
    deltas = _deltas(rng, params, num_samples, lengths)
    prompt_index, n = 1, max(num_samples, 1)

    fast = RequestOutputAssembler("r", PROMPT, params, tokenizer, track_new_text=True)
    scripted = _ScriptedDeltas()
    stream = ProcessOutputStream(scripted, fast)  # type: ignore[arg-type]
    feed = stream.choice_feed(prompt_index, n, token_updates)
    slow = RequestOutputAssembler("r", PROMPT, params, tokenizer)
    tracker = ChoiceTracker(n, token_updates)

    position = 0
    while position < len(deltas):
        step = rng.choice([1, 1, 1, 2, 3])  # how many deltas piled up before this read
        batch = deltas[position : position + step]
        position += len(batch)
        scripted.waiting.extend(batch)
        progress = feed.take_pending()
        assert progress is not None
        output = None
        for delta in batch:
            output = slow.add(delta)
        assert output is not None
        got = [_view(u) for u in progress.updates()]
        want = [_view(u) for u in tracker.updates(prompt_index, output)]
        assert got == want
        assert progress.finished == output.finished
        assert progress.usage_counts() == (
            len(output.prompt_token_ids),
            sum(len(c.token_ids) for c in output.outputs),
        )
    assert feed.take_pending() is None
    assert progress.finished


class _MergingTokenizer:
    """A tokenizer whose full decode is not the incremental one: "a" then "b" read "X" together
    (so a streamed "a" is later contradicted by the final text)."""

    pieces = ["a", "b", "c", " "]

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **kwargs: Any) -> str:
        return "".join(self.pieces[i] for i in ids).replace("ab", "X")


@pytest.mark.parametrize("seed", range(10))
def test_feed_follows_a_final_text_that_diverges(seed: int) -> None:
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=64)
    tokenizer = _MergingTokenizer()
    tokens = [rng.randrange(4) for _ in range(rng.randrange(2, 30))] + [0, 1]
    deltas = [
        RequestDelta("r", [SampleDelta(0, [t], -1.0, None, "length" if last else None)], last)
        for i, t in enumerate(tokens)
        for last in [i == len(tokens) - 1]
    ]
    fast = RequestOutputAssembler("r", PROMPT, params, tokenizer, track_new_text=True)
    scripted = _ScriptedDeltas()
    feed = ProcessOutputStream(scripted, fast).choice_feed(0, 1, False)  # type: ignore[arg-type]
    slow = RequestOutputAssembler("r", PROMPT, params, tokenizer)
    tracker = ChoiceTracker(1, False)
    streamed = []
    for delta in deltas:
        scripted.waiting.append(delta)
        progress = feed.take_pending()
        assert progress is not None
        got = [_view(u) for u in progress.updates()]
        assert got == [_view(u) for u in tracker.updates(0, slow.add(delta))]
        streamed += [view[2] for view in got]
    final = slow.output().outputs[0].text
    assert not final.startswith("".join(streamed[:-1]))  # the final text diverged


def test_take_text_holds_back_what_a_stop_string_could_claim(tokenizer: Any) -> None:
    params = SamplingParams(stop=["abcd"])  # 3 characters held back
    assembler = RequestOutputAssembler("r", PROMPT, params, tokenizer, track_new_text=True)
    ids = tokenizer("hello world, how are you", add_special_tokens=False)["input_ids"]
    taken = []
    for i, token_id in enumerate(ids):
        assembler.fold(RequestDelta("r", [SampleDelta(0, [token_id], -1.0 * i)]))
        (sample,) = assembler.samples
        taken.append(sample.take_text())
        assert "".join(taken) == assembler.output().outputs[0].text
        assert sample.taken_text() == "".join(taken)
    assert "".join(taken) == "hello world, how are you"[:-3]


def test_logprob_tokens_are_decoded_once_per_tokenizer(tokenizer: Any) -> None:
    calls = []

    class Counting:
        def decode(self, ids: list[int], **kwargs: Any) -> str:
            calls.append(ids)
            return str(tokenizer.decode(ids, **kwargs))

    counting = Counting()
    params = SamplingParams(logprobs=2, detokenize=True)
    for request in range(2):
        assembler = RequestOutputAssembler(f"r{request}", PROMPT, params, counting, stream=False)
        entry = assembler.logprob_entry(TokenLogprobs([300, 301], [-0.1, -0.2], [1, 2]))
        assert [lp.decoded_token for lp in entry.values()] == [
            tokenizer.decode([300]),
            tokenizer.decode([301]),
        ]
    assert calls == [[300], [301]]


# The app over a scripted engine client ----------------------------------------------------------


class ScriptedClient(EngineClient):
    """An engine client whose engine is a loop callback: every ``step`` each running request gets
    one token (``ord("a") + step``-ish ids), with logprobs when asked, until ``max_tokens``."""

    def __init__(self, step_s: float = 0.002) -> None:
        info = EngineInfo(
            model="hwlm-tiny", tokenizer=str(tokenizer_path("hwlm-tiny")),
            architecture="LlamaForCausalLM", backend="cpu", dtype="float32", vocab_size=1024,
            max_model_len=2048, max_logprobs=20, eos_token_ids=[2], block_size=16,
            num_kv_blocks=1000, sampling_defaults={}, pid=0,
        )  # fmt: skip
        super().__init__(info)
        self.step_s = step_s
        self.running: dict[str, list[Any]] = {}
        self.aborted: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._event_loop = loop

    def _send(self, message: Any) -> None:
        assert self._event_loop is not None
        if isinstance(message, AddRequest):
            self._event_loop.call_soon(self._accept, message)
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                if self.running.pop(request_id, None) is not None:
                    self.aborted.append(request_id)

    def _accept(self, message: AddRequest) -> None:
        rng = random.Random(str(message.prompt_token_ids))  # the same tokens for the same prompt
        options = message.params
        samples = [[[], []] for _ in range(options.n)]  # per sample: tokens, logprobs not sent
        self.running[message.request_id] = [message, 0, rng, samples, None]
        self._dispatch(Accepted([message.request_id]))
        if self._timer is None:
            assert self._event_loop is not None
            self._timer = self._event_loop.call_later(self.step_s, self._step)

    def _step(self) -> None:
        self._timer = None
        deltas = []
        for request_id, state in list(self.running.items()):
            message, done, rng, pending, prompt_lps = state
            options = message.params
            state[1] = done = done + 1
            last = done >= (options.max_tokens or 16)
            if done == 1 and options.prompt_logprobs is not None:
                prompt = message.prompt_token_ids
                prompt_lps = [None, *(_logprobs(rng, t, 1) for t in prompt[1:])]
            for tokens, lps in pending:
                token = rng.randrange(256, 1024)  # whole characters: offsets add up
                tokens.append(token)
                if options.logprobs is not None:
                    lps.append(_logprobs(rng, token, options.logprobs))
            if message.stream or last:  # without stream, one delta at the end
                samples = []
                for i, (tokens, lps) in enumerate(pending):
                    samples.append(
                        SampleDelta(i, list(tokens), -0.5 * done,
                                    list(lps) if options.logprobs is not None else None,
                                    "length" if last else None)
                    )  # fmt: skip
                    tokens.clear()
                    lps.clear()
                deltas.append(RequestDelta(request_id, samples, last, 0, prompt_lps))
                prompt_lps = None
            state[4] = prompt_lps
            if last:
                del self.running[request_id]
        self._dispatch(StepOutputs(deltas))
        if self.running:
            assert self._event_loop is not None
            self._timer = self._event_loop.call_later(self.step_s, self._step)


@pytest.fixture
def scripted_app(tokenizer: Any) -> Iterator[tuple[Any, ScriptedClient]]:
    from hwlm.server.api import build_app
    from hwlm.server.engine_seam_mp import ProcessEngineSeam

    client = ScriptedClient()
    seam = ProcessEngineSeam(client, tokenizer)  # type: ignore[arg-type]
    yield build_app(seam, "hwlm-tiny", None), client
    client.shutdown()


async def _call(app: Any, path: str, body: dict[str, Any], disconnect_after: int = 0) -> Any:
    """The response's status, and its body's sends; with ``disconnect_after`` the client leaves
    after that many sends."""
    payload = json.dumps(body).encode()
    sends: list[dict[str, Any]] = []
    left = asyncio.Event()
    finished = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": payload, "more_body": False}
        waits = [asyncio.ensure_future(e.wait()) for e in (left, finished)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sends.append(message)
        if message["type"] == "http.response.body":
            if not message.get("more_body", False):
                finished.set()
            if disconnect_after and len(sends) > disconnect_after:
                left.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("test", 80), "headers": [(b"content-type", b"application/json")],
    }  # fmt: skip
    await app(scope, receive, send)
    return sends


def _events(sends: list[dict[str, Any]]) -> list[Any]:
    assert sends[0]["type"] == "http.response.start" and sends[0]["status"] == 200
    body = b"".join(s.get("body", b"") for s in sends[1:])
    events = []
    for event in body.split(b"\n\n"):
        if event:
            data = event.removeprefix(b"data: ").decode()
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


COMPLETION_BODIES = [
    {"prompt": "Hello there", "max_tokens": 9},
    {"prompt": ["Hello there", "The sky"], "n": 2, "max_tokens": 7, "logprobs": 2},
    {"prompt": "Hello there", "max_tokens": 5, "echo": True, "logprobs": 1},
    {"prompt": [[5, 6, 7]], "max_tokens": 6, "echo": True},
]


@pytest.mark.parametrize("body", COMPLETION_BODIES)
def test_streamed_completion_adds_up_to_the_whole(
    scripted_app: tuple[Any, ScriptedClient], body: dict[str, Any]
) -> None:
    app, _ = scripted_app
    usage = {"stream_options": {"include_usage": True}}

    async def main() -> tuple[Any, Any]:
        whole = await _call(app, "/v1/completions", body)
        streamed = await _call(app, "/v1/completions", {**body, "stream": True, **usage})
        return json.loads(whole[1]["body"]), streamed

    whole, sends = asyncio.run(main())
    assert sends[-1]["more_body"] is False and sends[-1]["body"].endswith(b"data: [DONE]\n\n")
    events = _events(sends)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == whole["usage"] and events[-2]["choices"] == []
    merged: dict[int, dict[str, Any]] = {}
    for event in events[:-2]:
        assert event["usage"] is None
        for choice in event["choices"]:
            into = merged.setdefault(choice["index"], {"text": "", "logprobs": None})
            into["text"] += choice["text"]
            into["finish_reason"] = choice["finish_reason"]
            if choice["logprobs"] is not None:
                if into["logprobs"] is None:
                    into["logprobs"] = {k: [] for k in choice["logprobs"]}
                for key, values in choice["logprobs"].items():
                    into["logprobs"][key] += values
    assert len(merged) == len(whole["choices"])
    for choice in whole["choices"]:
        got = merged[choice["index"]]
        assert got["text"] == choice["text"]
        assert got["finish_reason"] == choice["finish_reason"]
        assert got["logprobs"] == choice["logprobs"]


def test_streamed_chat_adds_up_to_the_whole(scripted_app: tuple[Any, ScriptedClient]) -> None:
    app, _ = scripted_app
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8, "n": 2, "logprobs": True, "top_logprobs": 2,
    }  # fmt: skip

    async def main() -> tuple[Any, Any]:
        whole = await _call(app, "/v1/chat/completions", body)
        streamed = await _call(app, "/v1/chat/completions", {**body, "stream": True})
        return json.loads(whole[1]["body"]), streamed

    whole, sends = asyncio.run(main())
    events = _events(sends)
    assert events[-1] == "[DONE]"
    roles = [c for event in events[:2] for c in event["choices"]]  # first, one per choice
    assert [(c["index"], c["delta"]) for c in roles] == [
        (i, {"role": "assistant", "content": ""}) for i in range(2)
    ]
    texts: dict[int, str] = {}
    logprobs: dict[int, list[Any]] = {}
    for event in events[2:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
            logprobs.setdefault(choice["index"], []).extend(choice["logprobs"]["content"])
    for choice in whole["choices"]:
        assert texts[choice["index"]] == choice["message"]["content"]
        assert logprobs[choice["index"]] == choice["logprobs"]["content"]


def test_a_client_that_leaves_aborts_its_requests(scripted_app: tuple[Any, ScriptedClient]) -> None:
    app, client = scripted_app
    body = {"prompt": ["one", "two"], "max_tokens": 1000, "stream": True}

    async def main() -> list[dict[str, Any]]:
        sends = await _call(app, "/v1/completions", body, disconnect_after=3)
        await asyncio.sleep(0.05)
        return sends

    sends = asyncio.run(main())
    assert sends[0]["status"] == 200
    assert len(sends) <= 6  # it stopped soon after the client left
    assert len(client.aborted) == 2 and not client.running  # both prompts' requests


# Both seams on one real engine -------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: an engine client serves the first loop that uses it."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.run_until_complete(asyncio.sleep(0.01))  # let cancelled tasks finish
    event_loop.close()


@pytest.fixture(scope="module")
def two_apps(device: str) -> Iterator[tuple[Any, Any]]:
    from hwlm.engine.client_inproc import InProcessEngineClient
    from hwlm.engine.llm_engine import EngineArgs, LLMEngine
    from hwlm.server.api import build_app
    from hwlm.server.async_engine import AsyncLLMEngine
    from hwlm.server.engine_seam_mp import ProcessEngineSeam

    settings: dict[str, Any] = {"max_num_seqs": 8, "num_kv_blocks": 160}
    engine = AsyncLLMEngine(LLMEngine(EngineArgs("hwlm-tiny", device=device, **settings)))
    client = InProcessEngineClient(EngineArgs("hwlm-tiny", device=device, **settings))
    try:
        seam = ProcessEngineSeam(client)  # type: ignore[arg-type]
        yield build_app(engine, "hwlm-tiny", None), build_app(seam, "hwlm-tiny", None)
    finally:
        client.shutdown()
        engine.shutdown()


def _merged_stream(events: list[Any], chat: bool) -> Any:
    """Per choice: the streamed text, logprobs and finish reason; and the usage."""
    merged: dict[int, dict[str, Any]] = {}
    usage = None
    for event in events[:-1]:
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            into = merged.setdefault(choice["index"], {"text": "", "logprobs": {}, "finish": None})
            text = choice["delta"].get("content") if chat else choice["text"]
            into["text"] += text or ""
            for key, values in (choice["logprobs"] or {}).items():
                into["logprobs"].setdefault(key, []).extend(values)
            into["finish"] = choice["finish_reason"] or into["finish"]
    return merged, usage


STREAM_BODIES = [
    ("/v1/completions", {"prompt": ["Once upon a time", "The sky is"], "n": 2, "logprobs": 2,
                         "temperature": 0.8, "seed": 7}),
    ("/v1/completions", {"prompt": "Once upon a time", "echo": True, "logprobs": 1}),
    ("/v1/completions", {"prompt": "Once upon a time", "stop": [" the", "e"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story"}],
                              "logprobs": True, "top_logprobs": 2}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), STREAM_BODIES)
def test_both_seams_stream_the_same(
    two_apps: tuple[Any, Any], loop: asyncio.AbstractEventLoop, path: str, body: dict[str, Any]
) -> None:
    chat = path.endswith("chat/completions")
    full = {"max_tokens": 24, "temperature": 0, **body, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip

    async def main() -> list[Any]:
        return [_events(await _call(app, path, full)) for app in two_apps]

    thread, process = loop.run_until_complete(main())
    assert thread[-1] == process[-1] == "[DONE]"
    assert _merged_stream(thread, chat) == _merged_stream(process, chat)
