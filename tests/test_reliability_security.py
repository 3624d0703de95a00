"""Security, against a real ``python -m hwlm.server`` process started without --host (so on its
default address), with the API key from HWLM_API_KEY, CORS for one origin, and the most verbose
logging there is:

* every /v1 route of the server's own OpenAPI schema answers 401 without the right key;
* the key is compared with ``hmac.compare_digest`` (constant time);
* the key never appears in the server's log, whatever the client sends;
* CORS headers go only to the configured origin (and nowhere when none is: see
  test_reliability_input.py);
* the server listens on the loopback interface only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import types
from collections.abc import Iterator
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

from tests.reliability_servers import ServerProcess  # noqa: E402

KEY = "sk-reliability-7f3a9c"
ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
def server(device: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("security") / "server.log"
    args = ["--log-level", "debug", "hwlm-tiny", "--device", device, "--num-kv-blocks", "64"]
    args += ["--uvicorn-log-level", "trace", "--allowed-origins", ORIGIN]
    auth = {"Authorization": f"Bearer {KEY}"}
    process = ServerProcess(args, log, host=None, headers=auth, env={"HWLM_API_KEY": KEY})
    with process:
        yield process
    assert KEY not in log.read_text(), "the API key must never be logged"


def _v1_operations(url: str) -> list[tuple[str, str]]:
    paths = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()[
        "paths"
    ]
    operations = [
        (method.upper(), path)
        for path, methods in paths.items()
        if path.startswith("/v1")
        for method in methods
    ]
    assert len(operations) >= 3, operations  # models, completions, chat completions at least
    return operations


WRONG = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": KEY},  # no scheme
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": f"Basic {KEY}"},
]


def test_every_v1_route_needs_the_key(server: ServerProcess) -> None:
    body = {"prompt": "hi", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in _v1_operations(server.url):
            for headers in WRONG:
                r = client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
            r = client.request(method, path, json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code != 401, (method, path, r.text)
        assert client.get("/health").status_code == 200  # outside /v1: no key


def test_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    from hwlm.server import auth
    from hwlm.server.api import build_app

    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    engine: Any = types.SimpleNamespace(max_model_len=16)
    app = build_app(engine, "m", KEY)

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            good = await client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            bad = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
            return [good.status_code, bad.status_code]

    assert asyncio.run(main()) == [200, 401]
    assert len(calls) == 2 and all(b == KEY.encode() for _, b in calls)


def _in_process_statuses(headers: list[dict[str, str]]) -> list[int]:
    """/v1/models' status for each set of headers, on an app with KEY (no engine needed)."""
    from hwlm.server.api import build_app

    engine: Any = types.SimpleNamespace(max_model_len=16)
    app = build_app(engine, "m", KEY)

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.get("/v1/models", headers=h)).status_code for h in headers]

    return asyncio.run(main())


def test_bearer_scheme_is_case_insensitive() -> None:
    good = [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"bEaReR {KEY}", f"Bearer  {KEY}"]
    bad = [f"bearer{KEY}", f"Bearers {KEY}", f"bearer {KEY.upper()}", "bearer ", f"Token {KEY}"]
    statuses = _in_process_statuses([{"Authorization": h} for h in good + bad])
    assert statuses == [200] * len(good) + [401] * len(bad)


def test_key_never_logged(server: ServerProcess) -> None:
    """Requests with the key, near misses and failures; the log is checked again at shutdown."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for headers in WRONG:
            client.post("/v1/completions", json={"prompt": KEY}, headers=headers)
        good = {"Authorization": f"Bearer {KEY}"}
        client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=good)
        client.post("/v1/completions", json={"prompt": [10**9]}, headers=good)  # 400, logged
        client.post("/v1/completions", content=b"{", headers=good)
    assert KEY not in server.log.read_text()


def test_cors_only_for_the_configured_origin(server: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = httpx.options(f"{server.url}/v1/completions", headers={"Origin": ORIGIN, **preflight})
    assert ok.headers.get("access-control-allow-origin") == ORIGIN
    other = httpx.options(
        f"{server.url}/v1/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    r = httpx.get(f"{server.url}/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_listens_on_loopback_only_by_default(server: ServerProcess) -> None:
    assert server.proc is not None
    listening = [
        c.laddr.ip
        for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "the server listens nowhere"
    assert all(ipaddress.ip_address(ip).is_loopback for ip in listening), listening
