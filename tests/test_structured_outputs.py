"""Structured outputs (``SamplingParams.structured_outputs``) on the random-weight ``hwlm-tiny``:
with random weights, any valid output comes from the grammar's mask alone.

Each schema is sampled many times in one ``generate`` call, and every output must parse and
validate. The engine paths that change the order of events are each exercised: parallel sampling
(forks copy the grammar's state), prefix caching, preemption (recompute must not feed the grammar
a token twice), chunked prefill, overlapped steps (a constrained request needs its previous token
on the host), and batches that mix constrained and free rows.
"""

from __future__ import annotations

import json
import re
import threading
import traceback
from typing import Any

import jsonschema
import msgspec
import pytest
import torch

from hwlm import LLM, SamplingParams
from hwlm.engine.messages import AddRequest, SamplingOptions, input_decoder
from hwlm.outputs import RequestOutput
from hwlm.sampling.sampler import SampledBatch
from hwlm.sampling.structured import StepBitmask, apply_bitmask, check
from hwlm.sampling.structured.bitmask import BitmaskFiller
from hwlm.sampling_params import ParameterError, StructuredOutputsParams

pytest.importorskip("llguidance")

SCHEMAS: list[dict[str, Any]] = [
    {  # nested objects
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                },
                "required": ["name", "id"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    {  # an array of objects, numbers with bounds
        "type": "object",
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -10, "maximum": 10},
                        "y": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["points"],
        "additionalProperties": False,
    },
    {  # enums
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
            "count": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["color", "size", "count"],
        "additionalProperties": False,
    },
    {  # optional properties, an array of booleans, a nullable field
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
            "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
            "note": {"type": ["string", "null"], "maxLength": 4},
        },
        "required": ["code"],
        "additionalProperties": False,
    },
    {  # numbers with exclusive bounds, at the top level an array
        "type": "array",
        "items": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        "minItems": 2,
        "maxItems": 5,
    },
]
SAMPLES_PER_SCHEMA = 48
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def llm(device: str) -> LLM:
    return LLM(
        "hwlm-tiny",
        device=device,
        dtype="float32",
        max_model_len=256,
        block_size=8,
        num_kv_blocks=1024,
        max_num_seqs=256,
    )


def _json(schema: dict[str, Any] | str, **kwargs: Any) -> SamplingParams:
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return SamplingParams(structured_outputs=StructuredOutputsParams(json=schema), **kwargs)


def _valid(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def _texts(outputs: list[RequestOutput]) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


def test_hundreds_of_json_schema_samples_validate(llm: LLM) -> None:
    prompts, params, schemas = [], [], []
    for k, schema in enumerate(SCHEMAS):
        for i in range(SAMPLES_PER_SCHEMA):
            prompts.append(f"Sample {i} of schema {k}:")
            params.append(_json(schema if i % 2 else json.dumps(schema)))  # a dict or its text
            schemas.append(schema)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for out, schema in zip(outputs, schemas, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        _valid(completion.text, schema)
    assert len({o.outputs[0].text for o in outputs}) > len(SCHEMAS) * 8  # sampled, not fixed


def test_regex_outputs_fullmatch(llm: LLM) -> None:
    patterns = [r"[a-z]{3}-[0-9]{2,4}", r"(yes|no), because [a-z ]{1,12}\.", r"0x[0-9A-F]{4}"]
    params = [
        SamplingParams(max_tokens=40, structured_outputs=StructuredOutputsParams(regex=p))
        for p in patterns
        for _ in range(16)
    ]
    outputs = llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for out, p in zip(outputs, params, strict=True):
        assert p.structured_outputs is not None and p.structured_outputs.regex is not None
        assert re.fullmatch(p.structured_outputs.regex, out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"


def test_choice_outputs_are_one_of_the_choices(llm: LLM) -> None:
    choices = ["red", "green", "blue", 'dark "grey"', "naïve ünïcode"]
    params = SamplingParams(
        max_tokens=20, structured_outputs=StructuredOutputsParams(choice=choices)
    )
    outputs = llm.generate(["Pick a colour:"] * 40, params, use_tqdm=False)
    texts = _texts(outputs)
    assert set(texts) <= set(choices)
    assert len(set(texts)) >= 3  # sampled among them
    assert all(o.outputs[0].finish_reason == "stop" for o in outputs)


def test_json_object_lark_and_gbnf_grammars(llm: LLM) -> None:
    lark = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'
    gbnf = 'root ::= "<" [a-c]+ ">"'
    kinds = [
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (
            StructuredOutputsParams(grammar=lark),
            re.compile(r"\([0-9]{1,3}(,[0-9]{1,3})*\)").fullmatch,
        ),
        (StructuredOutputsParams(grammar=gbnf), re.compile(r"<[a-c]+>").fullmatch),
    ]
    # Any JSON object has free keys and strings, which random weights would rarely close:
    # favour the tokens that close them (the grammar still decides what is valid).
    tokenizer = llm.engine.tokenizer
    closing = {
        i: 6.0
        for i, text in enumerate(tokenizer.decode([i]) for i in range(len(tokenizer)))
        if set(text) & set('"}') and not set(text) & set("{[")
    }
    params = [
        SamplingParams(max_tokens=64, structured_outputs=so, logit_bias=closing)
        for so, _ in kinds
        for _ in range(8)
    ]
    checks = [ok for _, ok in kinds for _ in range(8)]
    outputs = llm.generate(["Go:"] * len(params), params, use_tqdm=False)
    for out, ok in zip(outputs, checks, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop" and ok(completion.text), completion.text


def test_n4_gives_four_valid_samples(llm: LLM) -> None:
    schema = SCHEMAS[0]
    outputs = llm.generate(["Four people:"] * 3, _json(schema, n=4), use_tqdm=False)
    for out in outputs:
        assert len(out.outputs) == 4
        for completion in out.outputs:
            _valid(completion.text, schema)
        assert len({c.text for c in out.outputs}) > 1  # each sample has its own grammar state
    best = llm.generate(["Best of:"], _json(schema, n=2, best_of=3), use_tqdm=False)
    assert len(best[0].outputs) == 2 and all(_valid(t, schema) for t in _texts(best))


def test_prefix_cached_prompts_stay_valid(llm: LLM) -> None:
    prompt = "A long shared instruction that fills several KV blocks of eight tokens each: " * 2
    first = llm.generate([prompt], _json(SCHEMAS[2]), use_tqdm=False)
    again = llm.generate([prompt] * 8, _json(SCHEMAS[2]), use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in again)
    for text in _texts(first + again):
        _valid(text, SCHEMAS[2])


@pytest.fixture(scope="module")
def cramped(device: str) -> LLM:
    """A KV cache too small for its batch (preemption) and a token budget smaller than a prompt
    (chunked prefill)."""
    return LLM(
        "hwlm-tiny",
        device=device,
        dtype="float32",
        max_model_len=128,
        block_size=4,
        num_kv_blocks=36,
        max_num_seqs=16,
        max_num_batched_tokens=16,
        enable_prefix_caching=False,
    )


def test_preemption_does_not_feed_the_grammar_twice(cramped: LLM) -> None:
    schema = SCHEMAS[2]
    before = cramped.engine.scheduler.num_preemptions
    outputs = cramped.generate([f"Item {i}:" for i in range(16)], _json(schema), use_tqdm=False)
    assert cramped.engine.scheduler.num_preemptions > before
    for text in _texts(outputs):
        _valid(text, schema)


def test_chunked_prefill(cramped: LLM) -> None:
    prompt = "word " * 30  # longer than the token budget: its prefill takes several steps
    assert len(cramped.engine.tokenizer(prompt)["input_ids"]) > 16
    prompts = [prompt + str(i) for i in range(4)]
    for text in _texts(cramped.generate(prompts, _json(SCHEMAS[2]), use_tqdm=False)):
        _valid(text, SCHEMAS[2])


def _small_engine(device: str, async_scheduling: bool) -> LLM:
    return LLM(
        "hwlm-tiny",
        device=device,
        dtype="float32",
        max_model_len=256,
        block_size=8,
        num_kv_blocks=512,
        max_num_batched_tokens=128,  # a cache nowhere near full: no drains for space
        async_scheduling=async_scheduling,
    )


@pytest.fixture(scope="module")
def overlapped(device: str) -> LLM:
    return _small_engine(device, async_scheduling=True)


@pytest.fixture(scope="module")
def stepwise(device: str) -> LLM:
    """One step at a time on every device (GPUs overlap steps by default)."""
    return _small_engine(device, async_scheduling=False)


def test_overlapped_steps_match_one_step_at_a_time(stepwise: LLM, overlapped: LLM) -> None:
    """Mixed constrained and free requests, seeded: the outputs do not depend on the batch, so
    overlapped steps must give exactly what one step at a time gives."""
    assert not stepwise.engine.async_scheduling
    params = []
    for i in range(12):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=24, seed=i, ignore_eos=True))
        else:
            params.append(_json(SCHEMAS[i % len(SCHEMAS)], seed=i))
    prompts = [f"Request {i}" for i in range(12)]
    a = stepwise.generate(prompts, params, use_tqdm=False)
    b = overlapped.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in b] == [o.outputs[0].token_ids for o in a]
    for i, out in enumerate(b):
        if i % 3:
            _valid(out.outputs[0].text, SCHEMAS[i % len(SCHEMAS)])
    assert not overlapped.engine.has_unfinished_requests()


def test_a_constrained_batch_overlaps_its_steps(
    stepwise: LLM, overlapped: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request constrained, with forks (n=2) and a trigger: overlapped steps give what one
    step at a time gives, and a grammar no longer drains: step n + 1's forward is queued before
    step n's tokens are read back (they advance the grammars before step n + 1's masks), and
    the masks are filled on the mask thread, not the engine's."""
    engine = overlapped.engine
    events: list[str] = []
    fillers: list[str] = []
    forward, to_output, must_drain, compute = (
        engine.runner._forward,
        SampledBatch.to_output,
        engine._must_drain,
        BitmaskFiller._compute,
    )

    def logged_compute(self, *args):  # noqa: ANN001, ANN002, ANN202
        fillers.append(threading.current_thread().name)
        return compute(self, *args)

    def logged_forward(inputs):  # noqa: ANN001, ANN202
        events.append("forward")
        return forward(inputs)

    def logged_read(self):  # noqa: ANN001, ANN202
        events.append("read")
        return to_output(self)

    def logged_must_drain(step):  # noqa: ANN001, ANN202
        drain = must_drain(step)
        events.append("drain" if drain else "overlap")
        return drain

    monkeypatch.setattr(engine.runner, "_forward", logged_forward)
    monkeypatch.setattr(engine, "_must_drain", logged_must_drain)
    monkeypatch.setattr(SampledBatch, "to_output", logged_read)
    monkeypatch.setattr(BitmaskFiller, "_compute", logged_compute)
    params = [_json(SCHEMAS[i % len(SCHEMAS)], seed=i, n=1 + i % 2) for i in range(8)]
    prompts = [f"Request {i}" for i in range(9)]
    (free,) = stepwise.generate(prompts[8:], SamplingParams(max_tokens=2, seed=9), use_tqdm=False)
    trigger = StructuredOutputsParams(
        choice=["yes", "no"], after_token_ids=free.outputs[0].token_ids
    )
    params.append(SamplingParams(max_tokens=40, seed=9, structured_outputs=trigger))
    a = stepwise.generate(prompts, params, use_tqdm=False)
    assert fillers and set(fillers) == {threading.current_thread().name}
    events.clear()
    fillers.clear()
    b = overlapped.generate(prompts, params, use_tqdm=False)
    assert len(fillers) > 10 and all(name.startswith("hwlm-masks") for name in fillers)
    assert [[c.token_ids for c in o.outputs] for o in b] == [
        [c.token_ids for c in o.outputs] for o in a
    ]
    assert [[c.finish_reason for c in o.outputs] for o in b] == [
        [c.finish_reason for c in o.outputs] for o in a
    ]
    for i, out in enumerate(b[:8]):
        for completion in out.outputs:
            _valid(completion.text, SCHEMAS[i % len(SCHEMAS)])
    assert b[8].outputs[0].token_ids[:2] == free.outputs[0].token_ids
    assert b[8].outputs[0].text.endswith(("yes", "no"))
    assert "drain" not in events
    # Each step with one in flight: the forward, then the previous step's tokens.
    steps = "".join(e[0] for e in events).split("o")[1:]
    assert len(steps) > 10 and all(step.startswith("fr") for step in steps[:-1])
    assert not engine.has_unfinished_requests()


def test_free_rows_of_a_mixed_batch_are_untouched(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [f"Free prompt {i}" for i in range(4)]
    alone = llm.generate(prompts, free, use_tqdm=False)
    mixed = llm.generate(
        prompts + ["Constrained"] * 4, [free] * 4 + [_json(SCHEMAS[0])] * 4, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in mixed[:4]] == [o.outputs[0].token_ids for o in alone]
    for text in _texts(mixed[4:]):
        _valid(text, SCHEMAS[0])


def test_constraint_starts_after_the_given_tokens(llm: LLM) -> None:
    """``after_token_ids``: the model's own (greedy) output until it contains the trigger, then
    the grammar. The trigger is the first two tokens the model picks freely."""
    greedy = dict(temperature=0, max_tokens=16, ignore_eos=True)
    free = llm.generate(["Think first:"], SamplingParams(**greedy), use_tqdm=False)[0]
    trigger = free.outputs[0].token_ids[:2]
    prompt_ids = llm.engine.tokenizer("Think first:")["input_ids"]
    for prompt in (prompt_ids, prompt_ids + trigger):  # a trigger in the prompt does not count
        _check_after(llm, prompt, trigger, greedy)


def _check_after(llm: LLM, prompt: list[int], trigger: list[int], greedy: dict[str, Any]) -> None:
    choices = ["alpha", "beta"]
    so = StructuredOutputsParams(choice=choices, after_token_ids=trigger)
    free, constrained = (
        llm.generate(
            [{"prompt_token_ids": prompt}], SamplingParams(**greedy, structured_outputs=s)
        )[0].outputs[0]
        for s in (None, so)
    )
    ids = free.token_ids
    at = next((i for i in range(len(ids) - 1) if ids[i : i + 2] == trigger), None)
    if at is None:  # never triggered: the output is the free one
        assert constrained.token_ids == ids
        return
    assert constrained.token_ids[: at + 2] == ids[: at + 2]
    assert llm.engine.tokenizer.decode(constrained.token_ids[at + 2 :]) in choices
    assert constrained.finish_reason == "stop"


def test_max_tokens_cuts_json_with_length(llm: LLM) -> None:
    outputs = llm.generate(["Cut:"] * 4, _json(SCHEMAS[0], max_tokens=5), use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        assert completion.finish_reason == "length" and len(completion.token_ids) == 5
        assert completion.text.startswith('{"user') and completion.finish_reason == "length"


@pytest.mark.parametrize(
    ("so", "words"),
    [
        (dict(json='{"type": "nope"}'), "invalid structured_outputs.json"),
        (dict(json="{not json"), "not valid JSON"),
        (dict(regex="a(b"), "invalid structured_outputs.regex"),
        (dict(grammar="start: missing_rule"), "invalid structured_outputs.grammar"),
        (dict(structural_tag='{"structures": []}'), "structural_tag"),
    ],
)
def test_a_bad_constraint_is_a_clear_error(llm: LLM, so: dict[str, Any], words: str) -> None:
    params = StructuredOutputsParams(**so)
    with pytest.raises(ParameterError, match=re.escape(words)) as early:
        check(params, llm.engine.tokenizer)
    assert early.value.param == "structured_outputs" and "\n" not in str(early.value)
    with pytest.raises(ParameterError, match=re.escape(words)) as late:
        llm.generate(["x"], SamplingParams(structured_outputs=params), use_tqdm=False)
    assert "\n" not in str(late.value)
    assert not llm.engine.has_unfinished_requests()  # the engine goes on
    check(StructuredOutputsParams(json=SCHEMAS[0]), llm.engine.tokenizer)
    check(SamplingParams(), None)  # nothing to check


def test_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one of json, regex, choice"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got json, regex"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="after_token_ids"):
        StructuredOutputsParams(regex="a", after_token_ids=[])
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsn": {}})  # type: ignore[arg-type]
    assert SamplingParams(structured_outputs={"regex": "a"}).structured_outputs == (  # type: ignore[arg-type]
        StructuredOutputsParams(regex="a")
    )


def test_structural_tag(llm: LLM) -> None:
    """Free text; after each trigger ``<f>``, an object of the schema, then ``</f>``."""
    schema = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "additionalProperties": False,
    }
    tag = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f>"]}
    so = StructuredOutputsParams(structural_tag=json.dumps(tag))
    check(so, llm.engine.tokenizer)
    tokenizer = llm.engine.tokenizer
    likely = {i: 8.0 for i in range(len(tokenizer)) if tokenizer.decode([i]) in ("<", "f", ">")}
    params = SamplingParams(max_tokens=48, structured_outputs=so, logit_bias=likely)
    outputs = llm.generate(["Text:"] * 8, params, use_tqdm=False)
    calls = 0
    for out in outputs:
        completion = out.outputs[0]
        parts = completion.text.split("<f>")[1:]
        if completion.finish_reason == "length" and parts:
            parts.pop()  # cut by max_tokens
        for part in parts:
            found = re.match(r"(\{[^<]*\})</f>", part)
            assert found, completion.text
            _valid(found.group(1), schema)
            calls += 1
    assert calls > 0


def test_the_wire_form_carries_the_constraint() -> None:
    for so in (
        StructuredOutputsParams(json=SCHEMAS[0], after_token_ids=[5, 6]),
        StructuredOutputsParams(choice=["a", "b"]),
        StructuredOutputsParams(grammar="start: /x+/"),
    ):
        params = SamplingParams(n=2, structured_outputs=so)
        message = AddRequest("r", [1], SamplingOptions.from_params(params), False, 0.0)
        decoded = input_decoder().decode(msgspec.msgpack.encode(message))
        assert isinstance(decoded, AddRequest)
        assert decoded.params.to_params() == params


def test_bitmask_masks_every_forbidden_and_padding_id() -> None:
    """Against a per-token loop: partial batches, and logits wider than the mask."""
    gen = torch.Generator().manual_seed(0)
    vocab, words = 100, 3  # the mask covers 96 ids; ids 96..99 are padding
    mask = torch.randint(-(2**31), 2**31 - 1, (2, words), dtype=torch.int32, generator=gen)
    logits = torch.randn(4, vocab, generator=gen)
    out = apply_bitmask(logits, StepBitmask([1, 3], mask))
    expected = logits.clone()
    for k, row in enumerate([1, 3]):
        for token in range(vocab):
            allowed = token < 32 * words and (int(mask[k, token // 32]) >> (token % 32)) & 1
            if not allowed:
                expected[row, token] = float("-inf")
    assert torch.equal(out, expected)
    assert torch.isfinite(logits).all()  # the input is not modified
    whole_batch = apply_bitmask(logits[[1, 3]], StepBitmask([0, 1], mask))
    assert torch.equal(whole_batch, expected[[1, 3]])


def test_padding_ids_beyond_the_tokenizer_are_never_allowed(llm: LLM) -> None:
    from hwlm.sampling.structured import StructuredOutputs

    tokenizer = llm.engine.tokenizer
    outputs = StructuredOutputs(tokenizer, len(tokenizer) + 40, (2,))
    state = outputs.new_state(StructuredOutputsParams(regex="[a-z ]+"))
    assert state.vocab_size == len(tokenizer) + 40

    class _Seq:
        grammar = state
        is_finished = False

    filled = llm.engine.runner.sampler.masks.fill([_Seq()])  # type: ignore[list-item]
    assert filled is not None
    logits = torch.zeros(1, len(tokenizer) + 40)
    masked = apply_bitmask(logits, filled)
    assert torch.isinf(masked[0, len(tokenizer) :]).all()
    assert torch.isfinite(masked[0, : len(tokenizer)]).any()


def test_in_the_engine_core_a_bad_request_fails_alone(llm: LLM) -> None:
    """Behind the engine core (the server's engine): a constraint that does not compile is
    refused, and one that a conflicting control makes unsatisfiable fails while running; the
    request beside them finishes."""
    from hwlm.engine.core import EngineCore
    from hwlm.engine.messages import RequestError, StepOutputs

    engine = llm.engine
    core = EngineCore(engine, info=None)  # type: ignore[arg-type]
    try:
        good = _json(SCHEMAS[2], seed=1)
        bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(b"))
        conflict = SamplingParams(
            temperature=0,
            allowed_token_ids=[5],  # outside the grammar: nothing is left to sample
            structured_outputs=StructuredOutputsParams(choice=["yes"]),
        )
        inputs = [
            AddRequest(name, [10, 11, 12], SamplingOptions.from_params(p), False, 0.0)
            for name, p in (("good", good), ("bad", bad), ("conflict", conflict))
        ]
        messages = core.process(inputs)  # type: ignore[arg-type]
        while core.has_work():
            messages += core.process([])
    finally:
        engine.isolate_request_errors = False
    errors = {m.request_id: m for m in messages if isinstance(m, RequestError)}
    assert set(errors) == {"bad", "conflict"}
    assert errors["bad"].rejected and errors["bad"].param == "structured_outputs"
    assert (
        not errors["conflict"].rejected
        and "not allowed by the grammar" in errors["conflict"].message
    )
    finished = [d for m in messages if isinstance(m, StepOutputs) for d in m.outputs if d.finished]
    assert [d.request_id for d in finished] == ["good"]
    text = engine.tokenizer.decode(finished[0].samples[0].token_ids)
    _valid(text, SCHEMAS[2])


def test_the_engine_leaves_matchers_alone_while_masks_fill(
    stepwise: LLM, overlapped: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mask thread holds its rows' matchers while it fills (llguidance refuses a second
    borrow: "Already mutably borrowed"), while the engine thread finishes the step before and
    schedules and prepares the next. Every use of a matcher by the engine thread between a
    fill's start and its result is recorded: there must be none, and the outputs are those of
    one step at a time."""
    from hwlm.sampling.structured.bitmask import MaskJob
    from hwlm.sampling.structured.state import GrammarState

    busy: set[int] = set()
    misuses: list[str] = []

    def get_matcher(self: GrammarState) -> Any:
        matcher = self.__dict__["_matcher"]
        if threading.current_thread() is threading.main_thread() and id(matcher) in busy:
            misuses.append("".join(traceback.format_stack(limit=4)))
        return matcher

    def set_matcher(self: GrammarState, matcher: Any) -> None:
        self.__dict__["_matcher"] = matcher

    prepare, result = BitmaskFiller._prepare, MaskJob.result

    def tracked_prepare(self, seqs):  # noqa: ANN001, ANN202
        work = prepare(self, seqs)
        if work is not None and threading.current_thread() is threading.main_thread():
            busy.update(id(m) for m in work[1])
        return work

    def tracked_result(self):  # noqa: ANN001, ANN202
        try:
            return result(self)
        finally:
            busy.clear()

    params = [_json(SCHEMAS[i % len(SCHEMAS)], seed=i, max_tokens=48) for i in range(16)]
    prompts = [f"Busy matchers {i}" for i in range(16)]
    a = stepwise.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(GrammarState, "matcher", property(get_matcher, set_matcher), raising=False)
    monkeypatch.setattr(BitmaskFiller, "_prepare", tracked_prepare)
    monkeypatch.setattr(MaskJob, "result", tracked_result)
    b = overlapped.generate(prompts, params, use_tqdm=False)
    assert not misuses, misuses[0]
    assert [o.outputs[0].token_ids for o in b] == [o.outputs[0].token_ids for o in a]
    assert [o.outputs[0].finish_reason for o in b] == [o.outputs[0].finish_reason for o in a]
    assert any(o.outputs[0].finish_reason == "stop" for o in b)  # grammars that completed


def test_grammar_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HWLM_GRAMMAR_THREADS`` sizes llguidance's pool; a bad value fails when the engine's
    structured outputs are set up, naming the variable."""
    from hwlm.sampling.structured import StructuredOutputs
    from hwlm.sampling.structured.library import grammar_threads

    monkeypatch.setenv("HWLM_GRAMMAR_THREADS", "3")
    assert grammar_threads() == 3
    monkeypatch.delenv("HWLM_GRAMMAR_THREADS")
    assert grammar_threads() is None
    for bad in ("0", "-2", "four"):
        monkeypatch.setenv("HWLM_GRAMMAR_THREADS", bad)
        with pytest.raises(ValueError, match="HWLM_GRAMMAR_THREADS must be a positive"):
            StructuredOutputs(None, 1024, (2,))
