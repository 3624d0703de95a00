"""EngineClient: the engine core behind messages, on a thread or in its own process.

Both clients run hwlm-tiny and are checked against ``LLM.generate`` on the same prompts and
settings (token ids, logprobs, text, finish and stop reasons), with the deltas carrying only what
is new. Then what differs between them: the engine process's title, what happens when it is
killed, when the API process dies, and that shutdown leaves nothing behind.

The clients serve one event loop, run here on a thread for the whole module (``run`` submits a
coroutine to it), so that a module-scoped client outlives each test.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hwlm import LLM
from hwlm.engine.client import EngineClient, EngineDeadError
from hwlm.engine.client_inproc import InProcessEngineClient
from hwlm.engine.client_mp import MultiProcessEngineClient
from hwlm.engine.client_outputs import RequestOutputAssembler
from hwlm.engine.messages import EngineStats, RequestDelta, SamplingOptions
from hwlm.engine_args import EngineArgs
from hwlm.outputs import Logprob, RequestOutput
from hwlm.sampling_params import ParameterError, SamplingParams
from hwlm.text.tokenizer import load_tokenizer

T = TypeVar("T")

SETTINGS: dict[str, Any] = {"max_model_len": 256, "num_kv_blocks": 96, "max_num_seqs": 16}
PROMPTS = ["Hello, my name is", "The capital of France is", "The future of AI is"]
LINUX = sys.platform.startswith("linux")


# Fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=event_loop.run_forever, daemon=True)
    thread.start()
    yield event_loop
    event_loop.call_soon_threadsafe(event_loop.stop)
    thread.join(10)
    event_loop.close()


def run(loop: asyncio.AbstractEventLoop, coro: Awaitable[T], timeout: float = 120) -> T:
    async def wrapped() -> T:
        return await coro

    return asyncio.run_coroutine_threadsafe(wrapped(), loop).result(timeout)


def engine_args(device: str, **overrides: Any) -> EngineArgs:
    return EngineArgs("hwlm-tiny", device=device, **{**SETTINGS, **overrides})


@pytest.fixture(scope="module", params=["inproc", "mp"])
def client(request: pytest.FixtureRequest, device: str) -> Iterator[EngineClient]:
    kind = InProcessEngineClient if request.param == "inproc" else MultiProcessEngineClient
    engine_client = kind(engine_args(device))
    yield engine_client
    engine_client.shutdown()


@pytest.fixture(scope="module")
def llm(device: str) -> LLM:
    return LLM("hwlm-tiny", device=device, offline=False, **SETTINGS)


@pytest.fixture(scope="module")
def tokenizer(llm: LLM) -> Any:
    return llm.get_tokenizer()


_ids = iter(range(10**9))


def new_id() -> str:
    return f"req-{next(_ids)}"


async def collect(
    client: EngineClient,
    prompt: str | list[int],
    params: SamplingParams,
    tokenizer: Any,
    stream: bool,
) -> tuple[RequestOutput, list[RequestDelta]]:
    """One request's final output (assembled on the API side) and its deltas."""
    ids = list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else prompt
    text = prompt if isinstance(prompt, str) else None
    request_id = new_id()
    assembler = RequestOutputAssembler(
        request_id, ids, params, tokenizer, prompt=text, stream=stream
    )
    deltas, output = [], None
    async for delta in client.generate(request_id, ids, params, stream=stream):
        deltas.append(delta)
        output = assembler.add(delta)
    assert output is not None and output.finished
    return output, deltas


def assert_same_entry(got: dict[int, Logprob] | None, want: dict[int, Logprob] | None) -> None:
    assert (got is None) == (want is None)
    if got is None or want is None:
        return
    assert list(got) == list(want)
    for token_id, lp in want.items():
        assert got[token_id].logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert got[token_id].rank == lp.rank
        assert got[token_id].decoded_token == lp.decoded_token


def assert_same_output(got: RequestOutput, want: RequestOutput) -> None:
    assert got.prompt == want.prompt
    assert got.prompt_token_ids == want.prompt_token_ids
    assert len(got.outputs) == len(want.outputs)
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert (g.index, g.token_ids, g.text) == (w.index, w.token_ids, w.text)
        assert (g.finish_reason, g.stop_reason) == (w.finish_reason, w.stop_reason)
        assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-5)
        assert (g.logprobs is None) == (w.logprobs is None)
        for g_entry, w_entry in zip(g.logprobs or [], w.logprobs or [], strict=True):
            assert_same_entry(g_entry, w_entry)
    assert (got.prompt_logprobs is None) == (want.prompt_logprobs is None)
    for g_entry, w_entry in zip(got.prompt_logprobs or [], want.prompt_logprobs or [], strict=True):
        assert_same_entry(g_entry, w_entry)


def wait_for_stats(
    client: EngineClient, ok: Callable[[EngineStats], bool], timeout: float = 10
) -> EngineStats:
    deadline = time.monotonic() + timeout
    while not ok(stats := client.stats_snapshot()):
        assert time.monotonic() < deadline, f"stats never settled: {stats}"
        time.sleep(0.02)
    return stats


def idle(stats: EngineStats) -> bool:
    return (stats.num_running, stats.num_waiting) == (0, 0) and (
        stats.num_free_blocks == stats.num_blocks
    )


# Both clients -------------------------------------------------------------------------------------


def _greedy_text(llm: LLM) -> str:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].text


CASES: dict[str, Callable[[LLM], SamplingParams]] = {
    "greedy-logprobs": lambda llm: SamplingParams(temperature=0, max_tokens=10, logprobs=3),
    "seeded-n2": lambda llm: SamplingParams(
        n=2, temperature=0.9, top_p=0.9, seed=7, max_tokens=10, logprobs=1
    ),
    "best-of": lambda llm: SamplingParams(n=2, best_of=3, temperature=1.0, seed=3, max_tokens=8),
    "prompt-logprobs": lambda llm: SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=2),
    "stop-string": lambda llm: SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=[_greedy_text(llm)[3:5]]
    ),
    "stop-string-kept": lambda llm: SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        stop=[_greedy_text(llm)[3:5]],
        include_stop_str_in_output=True,
    ),
    "penalties-no-text": lambda llm: SamplingParams(
        temperature=0.7, seed=11, max_tokens=10, repetition_penalty=1.3, detokenize=False
    ),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "final-only"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_llm_generate(
    client: EngineClient,
    llm: LLM,
    tokenizer: Any,
    loop: asyncio.AbstractEventLoop,
    case: str,
    stream: bool,
) -> None:
    params = CASES[case](llm)
    if stream and params.best_of != params.n:
        pytest.skip("best_of > n is not streamable")
    want = llm.generate(PROMPTS, params, use_tqdm=False)

    async def all_prompts() -> list[tuple[RequestOutput, list[RequestDelta]]]:
        return await asyncio.gather(
            *(collect(client, p, params, tokenizer, stream) for p in PROMPTS)
        )

    got = run(loop, all_prompts())
    for (output, deltas), expected in zip(got, want, strict=True):
        assert_same_output(output, expected)
        if not stream:
            assert len(deltas) == 1


def test_deltas_carry_only_what_is_new(
    client: EngineClient, tokenizer: Any, loop: asyncio.AbstractEventLoop
) -> None:
    params = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1
    )
    prompt_ids = list(tokenizer(PROMPTS[1])["input_ids"])
    before, serving_before = client.stats_snapshot(), client.serving_snapshot()
    _, deltas = run(loop, collect(client, prompt_ids, params, tokenizer, stream=True))
    assert len(deltas) == 6
    for i, delta in enumerate(deltas):
        (sample,) = delta.samples
        assert len(sample.token_ids) == 1 and sample.logprobs is not None
        assert len(sample.logprobs) == 1
        assert (delta.prompt_logprobs is not None) == (i == 0)
        assert delta.finished == (i == 5) == (sample.finish_reason == "length")
    assert deltas[0].prompt_logprobs is not None
    assert len(deltas[0].prompt_logprobs) == len(prompt_ids)
    # The counters were sent before the last delta, so they already include this request.
    after = client.stats_snapshot()
    assert after.generation_tokens - before.generation_tokens == 6
    assert after.prompt_tokens - before.prompt_tokens == len(prompt_ids)
    assert after.finished.get("length", 0) - before.finished.get("length", 0) == 1
    serving = client.serving_snapshot()  # as /metrics reads them
    assert serving.generation_tokens == after.generation_tokens
    assert serving.e2e.count - serving_before.e2e.count == 1
    assert serving.itl.count - serving_before.itl.count == 5
    assert sum(serving.ttft.counts) == serving.ttft.count


def test_abort_mid_stream_frees_the_request(
    client: EngineClient, tokenizer: Any, loop: asyncio.AbstractEventLoop
) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompt_ids = list(tokenizer(PROMPTS[0])["input_ids"])
    aborted_before = client.stats_snapshot().finished.get("abort", 0)

    async def read_two_then_leave() -> int:
        stream = await client.add_request(new_id(), prompt_ids, params)
        seen = 0
        async with stream:
            async for delta in stream:
                seen += len(delta.samples[0].token_ids)
                if seen >= 2:
                    break
        return seen

    assert run(loop, read_two_then_leave()) == 2
    assert client.num_unfinished_requests() == 0
    stats = wait_for_stats(
        client, lambda s: idle(s) and s.finished.get("abort", 0) > aborted_before
    )
    assert stats.finished["abort"] == aborted_before + 1
    output, _ = run(
        loop, collect(client, prompt_ids, SamplingParams(max_tokens=3), tokenizer, True)
    )
    assert len(output.outputs[0].token_ids) == 3


def _out_of_range(field: str, value: Any) -> SamplingParams:
    params = SamplingParams(max_tokens=4)
    setattr(params, field, value)  # past the API side's checks: the engine must catch it
    return params


BAD_REQUESTS: dict[str, tuple[Callable[[int, int], SamplingParams], str]] = {
    "stop-token-outside-vocab": (
        lambda vocab, _: SamplingParams(stop_token_ids=[vocab + 5]),
        "stop_token_ids",
    ),
    "too-many-logprobs": (lambda _, most: SamplingParams(logprobs=most + 1), "logprobs"),
    "top-p-out-of-range": (lambda *_: _out_of_range("top_p", 1.5), "top_p"),
    "best-of-streamed": (lambda *_: SamplingParams(n=1, best_of=2), "best_of"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_names_its_parameter(
    client: EngineClient, tokenizer: Any, loop: asyncio.AbstractEventLoop, case: str
) -> None:
    make, param = BAD_REQUESTS[case]
    params = make(client.info.vocab_size, client.info.max_logprobs)
    prompt_ids = list(tokenizer(PROMPTS[0])["input_ids"])
    with pytest.raises(ParameterError) as caught:
        run(loop, client.add_request(new_id(), prompt_ids, params))
    assert caught.value.param == param
    assert client.is_healthy() and client.num_unfinished_requests() == 0
    output, _ = run(
        loop, collect(client, prompt_ids, SamplingParams(max_tokens=2), tokenizer, True)
    )
    assert len(output.outputs[0].token_ids) == 2


def test_a_bad_prompt_is_refused(
    client: EngineClient, tokenizer: Any, loop: asyncio.AbstractEventLoop
) -> None:
    vocab = client.info.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(loop, client.add_request(new_id(), [1, vocab + 3], SamplingParams()))
    with pytest.raises(ValueError, match="already in use"):

        async def twice() -> None:
            stream = await client.add_request("dup", [1, 2, 3], SamplingParams(max_tokens=50))
            try:
                await client.add_request("dup", [1, 2, 3], SamplingParams())
            finally:
                stream.abort()

        run(loop, twice())
    assert client.is_healthy()
    wait_for_stats(client, idle)


def test_the_wire_form_holds_every_sampling_field() -> None:
    assert set(SamplingOptions.__struct_fields__) == set(SamplingParams.__dataclass_fields__)
    params = SamplingParams(
        n=2, temperature=0.5, stop="x", seed=2**64 - 1, logit_bias={3: -2.5}, bad_words=["a"]
    )
    assert SamplingOptions.from_params(params).to_params() == params


def test_the_handshake_names_the_tokenizer(client: EngineClient, tokenizer: Any) -> None:
    ours = load_tokenizer(client.info.tokenizer)
    assert ours(PROMPTS[1])["input_ids"] == tokenizer(PROMPTS[1])["input_ids"]
    assert client.info.vocab_size == len(tokenizer) and client.info.eos_token_ids


def test_the_engine_runs_where_the_client_says(client: EngineClient) -> None:
    if isinstance(client, InProcessEngineClient):
        assert client.info.pid == os.getpid()
        return
    pid = client.info.pid
    assert pid != os.getpid()
    if LINUX:
        assert b"hwlm::engine" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "hwlm::engine"


# The engine process -------------------------------------------------------------------------------

linux_only = pytest.mark.skipif(not LINUX, reason="reads /proc")


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` stopped running; fails after ``timeout``."""
    start = time.monotonic()
    while running(pid):
        assert time.monotonic() - start < timeout, f"process {pid} is still running"
        time.sleep(0.05)
    return time.monotonic() - start


def engine_children() -> list[int]:
    """Processes of ours titled hwlm::engine that are still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and cmdline.startswith(b"hwlm::engine") and running(int(entry.name)):
            found.append(int(entry.name))
    return found


@linux_only
def test_kill_9_of_the_engine_fails_the_stream_quickly(
    device: str, tokenizer: Any, loop: asyncio.AbstractEventLoop
) -> None:
    client = MultiProcessEngineClient(engine_args(device, max_model_len=1024, num_kv_blocks=80))
    try:
        params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
        prompt_ids = list(tokenizer(PROMPTS[0])["input_ids"])

        async def kill_mid_stream() -> float:
            stream = await client.add_request(new_id(), prompt_ids, params)
            first = await stream.__anext__()
            assert not first.finished
            os.kill(client.pid, signal.SIGKILL)
            start = time.monotonic()

            async def drain() -> None:
                async for _ in stream:
                    pass

            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(drain(), timeout=10)
            return time.monotonic() - start

        assert run(loop, kill_mid_stream()) < 5
        assert not client.is_healthy()
        assert client.num_unfinished_requests() == 0
        with pytest.raises(EngineDeadError):
            run(loop, client.add_request(new_id(), prompt_ids, params))
        assert client.stats_snapshot().num_running == 0
    finally:
        start = time.monotonic()
        client.shutdown()
        assert time.monotonic() - start < 5


PARENT = """
import sys, time
from hwlm.engine.client_mp import MultiProcessEngineClient
from hwlm.engine_args import EngineArgs

if __name__ == "__main__":
    args = EngineArgs("hwlm-tiny", device=sys.argv[1], max_model_len=64, num_kv_blocks=8)
    print(MultiProcessEngineClient(args).pid, flush=True)
    time.sleep(300)
"""


@linux_only
def test_the_engine_exits_when_the_api_process_dies(device: str) -> None:
    engine_pid = None
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, device], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            ready, _, _ = select.select([parent.stdout], [], [], 180)
            assert ready, "the parent process never reported its engine"
            engine_pid = int(parent.stdout.readline())
            assert running(engine_pid)
            parent.send_signal(signal.SIGKILL)
            parent.wait(10)
            assert wait_gone(engine_pid, timeout=10) < 5
        finally:
            parent.kill()
            if engine_pid is not None and running(engine_pid):
                os.kill(engine_pid, signal.SIGKILL)


@linux_only
def test_shutdown_leaves_no_process_behind(
    device: str, tokenizer: Any, loop: asyncio.AbstractEventLoop
) -> None:
    others = set(engine_children())  # the module's client, say
    client = MultiProcessEngineClient(engine_args(device))
    folder = Path(client._engine.folder)
    assert folder.is_dir() and client.info.pid in engine_children()
    prompt_ids = list(tokenizer(PROMPTS[2])["input_ids"])

    async def in_flight_then_shutdown() -> None:
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = await client.add_request(new_id(), prompt_ids, long)
        await stream.__anext__()
        client.shutdown(timeout=0)  # as a second Ctrl-C does: fail what runs, do not wait
        with pytest.raises(EngineDeadError):
            async for delta in stream:  # what arrived before the shutdown, then the error
                assert not delta.finished

    output, _ = run(
        loop, collect(client, prompt_ids, SamplingParams(max_tokens=3), tokenizer, True)
    )
    assert len(output.outputs[0].token_ids) == 3
    run(loop, in_flight_then_shutdown())
    client.shutdown()
    assert not running(client.info.pid)
    assert not folder.exists()
    assert set(engine_children()) == others
    assert not client.is_healthy()
    with pytest.raises(EngineDeadError):
        run(loop, client.add_request(new_id(), prompt_ids, SamplingParams()))
    client.shutdown()  # idempotent


@linux_only
def test_a_bad_model_fails_start_up_in_one_line(device: str) -> None:
    others = set(engine_children())
    start = time.monotonic()
    with pytest.raises(ValueError) as caught:
        MultiProcessEngineClient(EngineArgs("./no/such/model", device=device))
    message = str(caught.value)
    assert "does not exist" in message and "\n" not in message
    assert time.monotonic() - start < 60
    assert set(engine_children()) <= others  # (an earlier test's engine may still be exiting)


class _Transport(EngineClient):
    """A client whose engine is this test: it records what is sent and is told what comes back."""

    def __init__(self) -> None:
        from hwlm.engine.messages import EngineInfo

        info = EngineInfo(
            model="m", tokenizer="m", architecture="a", backend="cpu", dtype="float32",
            vocab_size=10, max_model_len=64, max_logprobs=-1, eos_token_ids=[], block_size=4,
            num_kv_blocks=8, sampling_defaults={}, pid=0,
        )  # fmt: skip
        super().__init__(info)
        self.sent: list[Any] = []

    def shutdown(self, timeout: float = 10.0) -> None:
        pass

    def _send(self, message: Any) -> None:
        self.sent.append(message)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def _alive(self) -> bool:
        return True


def test_waiting_sequences_follow_the_engines_count_and_what_it_cannot_see_yet() -> None:
    """The estimate is the engine's waiting count (every API process's requests) plus this
    client's requests on their way or accepted since those stats; running or finished samples
    are not counted (before: every sample of an unfinished request that was not running)."""
    from hwlm.engine.messages import Accepted, RequestError

    async def scenario() -> list[int]:
        client = _Transport()
        seen = [client.num_waiting_sequences()]
        add = asyncio.ensure_future(
            client.add_request("a", [1, 2], SamplingParams(n=3, max_tokens=2))
        )
        await asyncio.sleep(0)
        seen.append(client.num_waiting_sequences())  # on its way: 3
        client._dispatch_all([Accepted(["a"])])
        await add
        seen.append(client.num_waiting_sequences())  # accepted, not in the stats yet: 3
        client._dispatch_all([EngineStats(num_waiting_seqs=5)])  # it and another client's 2
        seen.append(client.num_waiting_sequences())
        client._dispatch_all([EngineStats(num_running_seqs=3, num_waiting_seqs=0)])
        seen.append(client.num_waiting_sequences())  # all running: nothing waits
        failed = asyncio.ensure_future(client.add_request("b", [1], SamplingParams(n=2)))
        await asyncio.sleep(0)
        seen.append(client.num_waiting_sequences())
        client._dispatch_all([RequestError("b", "bad", "prompt")])
        with pytest.raises(ParameterError):
            await failed
        seen.append(client.num_waiting_sequences())
        return seen

    assert asyncio.run(scenario()) == [0, 3, 3, 5, 0, 2, 0]
