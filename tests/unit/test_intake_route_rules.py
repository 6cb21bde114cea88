"""The route rules of consumer.intake_route, each checked against ddtrace 4.16's own code where it has one."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from ddtrace.internal import agent as ddtrace_agent
from ddtrace.internal.runtime.container import CGroupInfo
from ddtrace.internal.settings import _agent as ddtrace_agent_settings
from ddtrace.internal.settings._agentless import AgentlessConfig
from ddtrace.llmobs import _writer
from ddtrace.llmobs._writer import LLMObsEvalMetricWriter

from consumer.config import Settings
from consumer.intake_route import (
    CONTAINER_ID_HEADER,
    DEFAULT_AGENT_SOCKET,
    ENTITY_ID_HEADER,
    AgentAnswer,
    IntakeRoute,
    NoRoute,
    RoutedSink,
    RouteSettings,
    agent_url,
    choose_route,
    container_headers,
    decide,
    has_evp_proxy,
    llmobs_agentless,
)
from consumer.metrics import Metrics
from consumer.sink import Rejection
from consumer.stage import Refusals

pytestmark = pytest.mark.unit

KEY = "api-key-0123456789"
BASE = RouteSettings(llmobs_agentless=None, agentless=False, api_key=None, site="datadoghq.com", trace_agent_url=None,
                     agent_host=None, agent_port=None, override_origin=None)
EVP = AgentAnswer("agent_has_evp_proxy", "offers the EVP proxy")
NO_EVP = AgentAnswer("agent_without_evp_proxy", "does not offer the EVP proxy")
UNREACHABLE = AgentAnswer("agent_unreachable", "is unreachable (ConnectError)")
PATH = "/api/intake/llm-obs/v2/eval-metric"


# -- where the Agent is -----------------------------------------------------------------------------

AGENT_CASES: list[dict[str, Any]] = [
    {"trace_agent_url": "http://datadog-agent.datadog:8126"},
    {"trace_agent_url": "unix:///var/run/datadog/apm.socket"},
    {"trace_agent_url": "https://gateway.internal/datadog/"},
    {"trace_agent_url": "http://agent:9000", "agent_host": "other", "agent_port": 1},
    {"agent_host": "10.0.0.7"},
    {"agent_host": "node-1.internal"},
    {"agent_host": "::1"},
    {"agent_host": "fe80::1ff:fe23:4567:890a"},
    {"agent_host": "2001:db8::8", "agent_port": 18126},
    {"agent_port": 18126},
    {},
]


@pytest.mark.parametrize("given", AGENT_CASES, ids=[str(sorted(c.items())) for c in AGENT_CASES])
def test_agent_url_is_ddtraces(given: dict[str, Any]) -> None:
    """The Agent's URL is what ddtrace's _derive_trace_url makes of the same variables (IPv6 hosts bracketed)."""
    settings = replace(BASE, **given)
    theirs = ddtrace_agent_settings._derive_trace_url(SimpleNamespace(  # type: ignore[attr-defined]
        _trace_agent_url=settings.trace_agent_url, _trace_agent_hostname=None, _agent_host=settings.agent_host,
        _trace_agent_port=settings.agent_port, _agent_port=None))
    assert agent_url(settings) == theirs


def test_the_agents_socket_is_used_only_when_nothing_names_the_agent() -> None:
    """The default socket wins over localhost:8126 when it exists, but a given host or port wins over it."""
    def there(path: str) -> bool:
        return path == DEFAULT_AGENT_SOCKET

    assert agent_url(BASE, exists=there) == f"unix://{DEFAULT_AGENT_SOCKET}"
    assert agent_url(BASE, exists=lambda path: False) == "http://localhost:8126"
    assert agent_url(replace(BASE, agent_port=8126), exists=there) == "http://localhost:8126"
    assert agent_url(replace(BASE, agent_host="::1"), exists=there) == "http://[::1]:8126"
    assert agent_url(replace(BASE, trace_agent_url="http://a:1"), exists=there) == "http://a:1"


def test_only_a_given_port_counts_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """DD_TRACE_AGENT_PORT left at its default does not outrank the socket; the same value given does."""
    monkeypatch.delenv("DD_TRACE_AGENT_PORT", raising=False)
    assert RouteSettings.from_settings(Settings()).agent_port is None
    monkeypatch.setenv("DD_TRACE_AGENT_PORT", "8126")
    assert RouteSettings.from_settings(Settings()).agent_port == 8126


# -- agentless or not -------------------------------------------------------------------------------


@pytest.mark.parametrize("llmobs", [None, "true", "false"])
@pytest.mark.parametrize("everything", [None, "true", "false"])
def test_agentless_switches_combine_as_ddtraces(llmobs: str | None, everything: str | None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """DD_LLMOBS_AGENTLESS_ENABLED, else DD_AGENTLESS_ENABLED, else undecided: AgentlessConfig.llmobs's rule."""
    monkeypatch.setenv("DD_API_KEY", KEY)
    for name, value in (("DD_LLMOBS_AGENTLESS_ENABLED", llmobs), ("DD_AGENTLESS_ENABLED", everything)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    settings = RouteSettings.from_settings(Settings())
    assert llmobs_agentless(settings) == AgentlessConfig().llmobs


INFO_CASES: list[Any] = [
    {"endpoints": ["/v0.4/traces", "/evp_proxy/v2/", "/evp_proxy/v4/"]},
    {"endpoints": ["/evp_proxy/v2"]},
    {"endpoints": ["/v0.4/traces", "/evp_proxy/v1/", "/evp_proxy/v4/"]},
    {"endpoints": []},
    {"version": "7.50.0"},
    None,
]


@pytest.mark.parametrize("info", INFO_CASES)
def test_the_evp_proxy_is_recognised_as_ddtrace_does(info: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the Agent exactly when ddtrace's should_use_agentless, given the same /info (or none), says so."""
    monkeypatch.setattr(ddtrace_agent, "info", lambda *args, **kwargs: info)
    monkeypatch.setattr(_writer, "_SHOULD_USE_AGENTLESS", None)
    endpoints = info.get("endpoints") if info is not None else None
    assert has_evp_proxy(endpoints) == (not _writer.should_use_agentless(None))


def test_odd_endpoint_lists_mean_no_evp_proxy() -> None:
    """An endpoints field that is not a list of strings offers no EVP proxy, without failing."""
    assert not has_evp_proxy("/evp_proxy/v2/")
    assert not has_evp_proxy([None, 2, {"path": "/evp_proxy/v2/"}])
    assert has_evp_proxy([None, "/evp_proxy/v2/"])


# -- the decision -----------------------------------------------------------------------------------

AGENT = "http://10.0.0.7:8126"

DECISIONS: list[tuple[dict[str, Any], AgentAnswer | None, str, str]] = [
    ({"llmobs_agentless": True, "api_key": KEY}, None, "agentless", "llmobs_agentless_enabled"),
    ({"llmobs_agentless": False}, None, "agent", "llmobs_agentless_disabled"),
    ({"agentless": True, "api_key": KEY}, None, "agentless", "agentless_enabled"),
    ({"agentless": True, "llmobs_agentless": False, "api_key": KEY}, None, "agent", "llmobs_agentless_disabled"),
    ({}, EVP, "agent", "agent_has_evp_proxy"),
    ({"api_key": KEY}, EVP, "agent", "agent_has_evp_proxy"),
    ({"api_key": KEY}, NO_EVP, "agentless", "agent_without_evp_proxy"),
    ({"api_key": KEY}, UNREACHABLE, "agentless", "agent_unreachable"),
    ({}, NO_EVP, "none", "agent_without_evp_proxy"),
    ({}, UNREACHABLE, "none", "agent_unreachable"),
]


@pytest.mark.parametrize(("given", "answer", "kind", "reason"), DECISIONS,
                         ids=[f"{sorted(g)}-{a.reason if a else 'not_asked'}" for g, a, _, _ in DECISIONS])
def test_the_route_and_its_reason(given: dict[str, Any], answer: AgentAnswer | None, kind: str, reason: str) -> None:
    """Explicit switches decide alone; else the Agent's answer, with agentless only when an API key is set."""
    route = decide(replace(BASE, **given), AGENT, answer)
    assert (route.kind if isinstance(route, IntakeRoute) else "none", route.reason) == (kind, reason)
    if isinstance(route, NoRoute):
        assert "DD_API_KEY is not set" in route.why and AGENT in route.why
        assert route.refusal().component == "intake" and "DD_API_KEY" in route.refusal().hint


def test_an_open_question_needs_the_agents_answer() -> None:
    """Deciding without asking the Agent when the settings leave it open is a programming error, said so."""
    with pytest.raises(ValueError, match="ask the Agent"):
        decide(BASE, AGENT, None)


def test_agentless_posts_to_the_sites_intake_with_the_key() -> None:
    """Agentless: https://api.{DD_SITE} plus the eval-metric path, DD-API-KEY, and no EVP subdomain."""
    route = decide(replace(BASE, llmobs_agentless=True, api_key=KEY, site="datadoghq.eu"), AGENT, None)
    assert isinstance(route, IntakeRoute)
    assert (route.url, route.uds) == ("https://api.datadoghq.eu" + PATH, None)
    assert route.headers == {"Content-Type": "application/json", "DD-API-KEY": KEY}
    assert KEY not in repr(route)


@pytest.mark.parametrize(("agent", "url", "uds"), [
    ("http://10.0.0.7:8126", "http://10.0.0.7:8126/evp_proxy/v2" + PATH, None),
    ("http://[::1]:8126", "http://[::1]:8126/evp_proxy/v2" + PATH, None),
    ("https://gateway.internal/datadog/", "https://gateway.internal/datadog/evp_proxy/v2" + PATH, None),
    ("unix:///var/run/datadog/apm.socket", "http://localhost/evp_proxy/v2" + PATH, "/var/run/datadog/apm.socket"),
])
def test_through_the_agent_posts_to_its_evp_proxy(agent: str, url: str, uds: str | None) -> None:
    """Through the Agent: its URL (path kept, socket used) plus /evp_proxy/v2, the api subdomain, and no key."""
    route = decide(replace(BASE, llmobs_agentless=False, api_key=KEY), agent, None)
    assert isinstance(route, IntakeRoute)
    assert (route.url, route.uds) == (url, uds)
    assert route.headers == {"Content-Type": "application/json", "X-Datadog-EVP-Subdomain": "api"}


@pytest.mark.parametrize("agentless", [True, False])
@pytest.mark.parametrize("override", ["http://127.0.0.1:9999", "http://127.0.0.1:9999/", "http://stand-in:80/base/path",
                                      "https://intake.example/prefix/"])
def test_an_override_origin_replaces_only_the_origin_as_in_ddtraces_writer(override: str, agentless: bool) -> None:
    """DD_LLMOBS_OVERRIDE_ORIGIN keeps the route's path and headers, as LLMObsEvalMetricWriter builds them."""
    settings = replace(BASE, llmobs_agentless=agentless, api_key=KEY, site="datadoghq.eu", override_origin=override)
    route = decide(settings, AGENT, None)
    writer = LLMObsEvalMetricWriter(interval=1.0, timeout=1.0, is_agentless=agentless, _site="datadoghq.eu",
                                    _api_key=KEY, _override_url=override)
    # ddtrace's HTTP client appends the endpoint to the origin's own path.
    origin_path = override.split("://", 1)[1].partition("/")[2].rstrip("/")
    expected = override.split("://", 1)[0] + "://" + override.split("://", 1)[1].partition("/")[0]
    expected += ("/" + origin_path if origin_path else "") + "/" + writer._endpoint.lstrip("/")
    assert isinstance(route, IntakeRoute)
    assert writer._intake == override
    assert route.url == expected
    assert route.headers == writer._headers


def test_an_override_origin_may_be_a_socket() -> None:
    """A unix:// override origin is reached through that socket, with the route's own path."""
    route = decide(replace(BASE, llmobs_agentless=False, override_origin="unix:///tmp/intake.sock"), AGENT, None)
    assert isinstance(route, IntakeRoute)
    assert (route.url, route.uds) == ("http://localhost/evp_proxy/v2" + PATH, "/tmp/intake.sock")
    assert route.where == "unix:///tmp/intake.sock/evp_proxy/v2" + PATH


async def test_an_invalid_agent_url_is_no_route_not_a_crash() -> None:
    """An Agent URL no request can be made to (IPv6 without brackets) is reported as no route, asked or not."""
    bad = replace(BASE, trace_agent_url="http://::1:8126")
    told = decide(replace(bad, llmobs_agentless=False), agent_url(bad), None)
    assert isinstance(told, NoRoute) and "is not a valid URL" in told.why and "brackets" in told.hint
    asked = await choose_route(bad, identity={})
    assert isinstance(asked, NoRoute) and asked.reason == "agent_unreachable" and "not a valid URL" in asked.why


def test_the_containers_identity_goes_with_either_route() -> None:
    """The origin headers are sent on both routes, beside the route's own."""
    identity = {CONTAINER_ID_HEADER: "c" * 64, ENTITY_ID_HEADER: "ci-" + "c" * 64}
    for given in ({"llmobs_agentless": True, "api_key": KEY}, {"llmobs_agentless": False}):
        route = decide(replace(BASE, **given), AGENT, None, origin_headers=identity)
        assert isinstance(route, IntakeRoute)
        assert identity.items() <= route.headers.items()


# -- the container's identity -----------------------------------------------------------------------

CONTAINER_LINES = [
    "13:name=systemd:/docker/3726184226f5d3147c25fdeab5b60097e378e8a720503a5e19ecfdf29f869860",
    "11:perf_event:/kubepods/besteffort/pod3d274242-8ee0-11e9-a8a6-1e68d864ef1a/"
    "3e74d3fd9db4c9dd921ae05c2502fb984d0cde1b36e581b13f79c639da4518a1",
    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2d3da189_6407_48e3_9ab6_78188d75e609.slice/"
    "cri-containerd-7b0c6fd0e4e5b1a7e5f8b3c2f7f0a9e8d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6.scope",
    "1:name=systemd:/ecs/34dc0b5e626f2c5c4c5170e34b10e765-1234567890",
    "1:name=systemd:/system.slice/garden.service/garden/6f265890-5165-7fab-6b52-18d1",
]


@pytest.mark.parametrize("line", CONTAINER_LINES)
def test_a_container_id_is_read_as_ddtrace_reads_it(line: str) -> None:
    """Docker, Kubernetes (cgroup v1 and v2), ECS and Cloud Foundry ids: the id ddtrace's CGroupInfo finds."""
    info = CGroupInfo.from_line(line)
    assert info is not None and info.container_id
    headers = container_headers(f"12:pids:/\n{line}\n", host_namespace=True, inode_of=lambda path: 4242)
    assert headers == {CONTAINER_ID_HEADER: info.container_id, ENTITY_ID_HEADER: f"ci-{info.container_id}"}


def test_a_private_cgroup_namespace_sends_the_cgroup_inode() -> None:
    """Without a container id (cgroup v2, a private namespace), the entity id is the cgroup node's inode."""
    headers = container_headers("0::/\n", host_namespace=False, inode_of=lambda path: 4242)
    assert headers == {ENTITY_ID_HEADER: "in-4242"}


@pytest.mark.parametrize(("cgroup", "host_namespace", "inode"), [
    ("0::/\n", True, 4242),  # the host's cgroup namespace: not a container
    ("0::/\n", False, 1),  # not a real inode
    ("0::/\n", False, None),  # no such node
    ("9:name=systemd:/\n4:memory:/process_api/2d0d93572d5d92716a0db0fd094c7d00\n0::/\n", True, 1),
    ("", False, 4242),
    ("not a cgroup file\n", False, 4242),
])
def test_outside_a_container_neither_header_is_sent(cgroup: str, host_namespace: bool, inode: int | None) -> None:
    """A process on a host (or a file without a container's mark) sends no identity headers."""
    assert container_headers(cgroup, host_namespace=host_namespace, inode_of=lambda path: inode) == {}


# -- waiting for a route ----------------------------------------------------------------------------


class _Sink:
    def __init__(self, route: IntakeRoute) -> None:
        self.route = route
        self.sent: list[list[bytes]] = []
        self.closed = False

    async def send(self, metrics: Any, *, accepted: Any = None) -> list[Rejection]:
        self.sent.append(list(metrics))
        return []

    async def aclose(self) -> None:
        self.closed = True


async def test_without_a_route_the_sink_waits_unready_and_asks_again() -> None:
    """No route: refusal reported, send waits; once the Agent offers the EVP proxy, it clears and delivers there."""
    answers = [UNREACHABLE, NO_EVP, EVP]
    asked: list[str] = []

    async def ask(agent: str) -> AgentAnswer:
        asked.append(agent)
        return answers.pop(0)

    metrics = Metrics()
    refusals = Refusals(metrics)
    opened: list[_Sink] = []

    def open_sink(route: IntakeRoute) -> _Sink:
        opened.append(_Sink(route))
        return opened[-1]

    sink = RoutedSink(replace(BASE, agent_host="10.0.0.7"), open_sink=open_sink, ask=ask,
                      recheck_first_s=0.01, recheck_cap_s=0.02)
    first = await sink.start(refusals)
    assert isinstance(first, NoRoute) and first.reason == "agent_unreachable"
    reason = refusals.reason()
    assert reason is not None and "no route to the intake" in reason and "DD_API_KEY" in reason
    sending = asyncio.ensure_future(sink.send([b"{}"]))
    assert await asyncio.wait_for(sending, timeout=5) == []
    assert refusals.reason() is None and asked == ["http://10.0.0.7:8126"] * 3
    (used,) = opened
    assert used.route.kind == "agent" and used.sent == [[b"{}"]]
    await sink.aclose()
    assert used.closed


async def test_a_route_found_at_start_is_used_at_once() -> None:
    """A route at start opens the sink on it, reports nothing, and never asks again."""
    refusals = Refusals(Metrics())
    opened: list[_Sink] = []

    def open_sink(route: IntakeRoute) -> _Sink:
        opened.append(_Sink(route))
        return opened[-1]

    async def ask(agent: str) -> AgentAnswer:
        raise AssertionError("the settings decide: the Agent is not asked")

    sink = RoutedSink(replace(BASE, llmobs_agentless=True, api_key=KEY), open_sink=open_sink, ask=ask)
    route = await sink.start(refusals)
    assert isinstance(route, IntakeRoute) and route.kind == "agentless" and refusals.reason() is None
    assert await sink.send([b"1", b"2"]) == [] and opened[0].sent == [[b"1", b"2"]]
    await sink.aclose()


# -- what the settings refuse -----------------------------------------------------------------------


@pytest.mark.parametrize(("env", "message"), [
    ({"DD_AGENTLESS_ENABLED": "true"}, "DD_AGENTLESS_ENABLED=true needs DD_API_KEY"),
    ({"DD_LLMOBS_AGENTLESS_ENABLED": "true", "DD_LLMOBS_OVERRIDE_ORIGIN": "http://127.0.0.1:9"},
     "DD_LLMOBS_AGENTLESS_ENABLED=true needs DD_API_KEY"),
    ({"DD_TRACE_AGENT_URL": "tcp://agent:8126"}, "the scheme must be http, https or unix"),
    ({"DD_TRACE_AGENT_URL": "unix://"}, "names no socket"),
    ({"DD_TRACE_AGENT_URL": "http:///path"}, "names no host"),
    ({"DD_LLMOBS_OVERRIDE_ORIGIN": "localhost:9000"}, "the scheme must be http, https or unix"),
])
def test_settings_ddtrace_refuses_are_refused(env: dict[str, str], message: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Agentless without a key and an Agent URL ddtrace cannot use are configuration errors, said plainly."""
    for name in ("DD_API_KEY", "DD_AGENTLESS_ENABLED", "DD_LLMOBS_AGENTLESS_ENABLED", "DD_TRACE_AGENT_URL",
                 "DD_LLMOBS_OVERRIDE_ORIGIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        Settings()
