"""The route to the eval-metric intake, agentless or through the Datadog Agent's EVP proxy, as ddtrace chooses it.

An existing Datadog setup carries over unchanged because the rules are ddtrace 4.16's own, read from
its sources (the ``ddtrace`` package, paths below):

1. **Where the Agent is** (``internal/settings/_agent.py``, ``_derive_trace_url``): ``DD_TRACE_AGENT_URL``
   (``http``, ``https`` or ``unix``); else, when ``DD_AGENT_HOST`` or ``DD_TRACE_AGENT_PORT`` is given,
   ``http://{host or localhost}:{port or 8126}`` with an IPv6 host in brackets (``is_ipv6_hostname``); else
   ``unix:///var/run/datadog/apm.socket`` when that socket exists; else ``http://localhost:8126``.
2. **Agentless or not** (``internal/settings/_agentless.py``, ``AgentlessConfig.llmobs``):
   ``DD_LLMOBS_AGENTLESS_ENABLED`` when set; else true when ``DD_AGENTLESS_ENABLED`` is; else undecided, and
   then (``llmobs/_writer.py``, ``should_use_agentless``) the Agent is asked: ``GET /info``, and delivery
   goes through the Agent when one of its ``endpoints`` contains ``/evp_proxy/v2``, agentless otherwise (no
   answer, a 404 or another non-2xx answer included).
3. **Agentless needs DD_API_KEY** (``llmobs/_llmobs.py``, ``LLMObs.enable``, and
   ``AgentlessConfig.__init__``): ddtrace raises without one. An explicit agentless setting without a key is
   refused with the configuration (:mod:`consumer.config`); when the Agent was asked and cannot take the
   evaluations and no key is set, there is no route (:class:`NoRoute`): the service stays up, not ready
   with the reason, and asks the Agent again (:class:`RoutedSink`), instead of crash-looping.
4. **The request** (``llmobs/_writer.py``, ``BaseLLMObsWriter.__init__``): the origin is
   ``DD_LLMOBS_OVERRIDE_ORIGIN`` when set, else ``https://api.{DD_SITE}`` (agentless) or the Agent; the path
   is ``/api/intake/llm-obs/v2/eval-metric``, behind ``/evp_proxy/v2`` through the Agent, and appended to
   the origin's own path (an override origin with a path of its own takes the path without the
   ``/evp_proxy/v2`` prefix). Headers: ``DD-API-KEY`` agentless, ``X-Datadog-EVP-Subdomain: api`` through
   the Agent, and on every request the container's identity (rule 5).
5. **The container's identity** (``internal/runtime/container.py``, ``get_container_info`` and
   ``update_headers``): ``Datadog-Container-ID`` and ``Datadog-Entity-ID: ci-<id>`` when a line of
   ``/proc/self/cgroup`` ends in a container id, else ``Datadog-Entity-ID: in-<inode>`` of the process's
   cgroup node, so the Agent tags what it forwards with the pod and container. As in ddtrace's DogStatsD
   client (``vendor/dogstatsd/container.py``, ``ContainerID``), the inode is sent only outside the host's
   cgroup namespace and only when it is a real one (above 2): a process that is not in a container sends
   neither header.

The choice is made once, at start (:func:`choose_route`), and logged as one ``intake_route`` line with the
route and the reason. ``python -m consumer check`` reports the same choice.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog

from consumer.aio import Backoff, cancel_and_wait
from consumer.config import EVAL_METRIC_PATH, EVP_PROXY_PREFIX, Settings
from consumer.errors import ServiceRefused
from consumer.sink import Accepted, EvaluationSink, Rejection
from consumer.stage import Refusals

log = structlog.get_logger(__name__)

# ddtrace/internal/settings/_agent.py: DEFAULT_HOSTNAME, DEFAULT_TRACE_PORT, DEFAULT_UNIX_TRACE_PATH
DEFAULT_AGENT_HOST = "localhost"
DEFAULT_AGENT_PORT = 8126
DEFAULT_AGENT_SOCKET = "/var/run/datadog/apm.socket"
# ddtrace/internal/constants.py DEFAULT_TIMEOUT: AgentConfig.trace_agent_timeout_seconds, what /info may take
AGENT_INFO_TIMEOUT_S = 2.0
# ddtrace/llmobs/_constants.py: AGENTLESS_EVAL_BASE_URL ("https://api") + "." + DD_SITE; EVAL_SUBDOMAIN_NAME
AGENTLESS_ORIGIN = "https://api.{site}"
EVP_SUBDOMAIN = "api"
# ddtrace/internal/constants.py: CONTAINER_ID_HEADER_NAME, ENTITY_ID_HEADER_NAME
CONTAINER_ID_HEADER = "Datadog-Container-ID"
ENTITY_ID_HEADER = "Datadog-Entity-ID"
# While there is no route, the Agent is asked again after this, doubling up to the cap.
RECHECK_FIRST_S = 1.0
RECHECK_CAP_S = 30.0
UDS_ORIGIN = "http://localhost"  # the origin of a request over a UNIX socket (the Agent ignores the host)
NO_ROUTE_HINT = ("run a Datadog Agent with APM at DD_TRACE_AGENT_URL or DD_AGENT_HOST (its EVP proxy, Agent 7.x), "
                 "or set DD_API_KEY to deliver agentless")

BAD_URL_HINT = ("fix DD_TRACE_AGENT_URL, DD_AGENT_HOST / DD_TRACE_AGENT_PORT or DD_LLMOBS_OVERRIDE_ORIGIN "
                "(an IPv6 address in a URL goes in brackets: http://[::1]:8126)")

Reason = Literal["llmobs_agentless_enabled", "agentless_enabled", "llmobs_agentless_disabled",
                 "agent_has_evp_proxy", "agent_without_evp_proxy", "agent_unreachable", "agent_info_unavailable"]


@dataclass(frozen=True, kw_only=True)
class RouteSettings:
    """What the choice depends on: the ``DD_*`` variables, as plain values (``None`` where not given)."""

    llmobs_agentless: bool | None
    agentless: bool
    api_key: str | None = field(repr=False)
    site: str
    trace_agent_url: str | None
    agent_host: str | None
    agent_port: int | None
    override_origin: str | None

    @classmethod
    def from_settings(cls, s: Settings) -> RouteSettings:
        # ddtrace tells a given port from the default (``user_supplied_port``): only a given one outranks the socket.
        port_given = "dd_trace_agent_port" in s.model_fields_set
        return cls(llmobs_agentless=s.dd_llmobs_agentless_enabled, agentless=s.dd_agentless_enabled,
                   api_key=s.dd_api_key.get_secret_value() if s.dd_api_key else None, site=s.dd_site,
                   trace_agent_url=s.dd_trace_agent_url, agent_host=s.dd_agent_host,
                   agent_port=s.dd_trace_agent_port if port_given else None,
                   override_origin=s.dd_llmobs_override_origin)


@dataclass(frozen=True)
class AgentAnswer:
    """What the Agent's ``/info`` said: whether it offers the EVP proxy, and in words what was found."""

    reason: Literal["agent_has_evp_proxy", "agent_without_evp_proxy", "agent_unreachable", "agent_info_unavailable"]
    detail: str

    @property
    def evp_proxy(self) -> bool:
        return self.reason == "agent_has_evp_proxy"


@dataclass(frozen=True, kw_only=True)
class IntakeRoute:
    """Where and how to post: ``url`` (over the UNIX socket ``uds`` when set) with ``headers``."""

    kind: Literal["agentless", "agent"]
    reason: Reason
    why: str
    agent: str
    url: str
    uds: str | None
    headers: dict[str, str] = field(repr=False)  # holds DD-API-KEY when agentless

    @property
    def where(self) -> str:
        """The target as an operator would write it (``unix://<socket>`` + path over a socket)."""
        return f"unix://{self.uds}{urlsplit(self.url).path}" if self.uds else self.url

    def transport(self) -> httpx.AsyncHTTPTransport | None:
        """The transport the request needs: the UNIX socket's, or None for TCP."""
        return httpx.AsyncHTTPTransport(uds=self.uds) if self.uds else None


@dataclass(frozen=True, kw_only=True)
class NoRoute:
    """Neither the Agent nor agentless delivery can take the evaluations now, and why."""

    reason: Reason
    why: str
    agent: str
    hint: str = NO_ROUTE_HINT

    def refusal(self) -> ServiceRefused:
        return ServiceRefused("intake", f"no route to the intake: {self.why}", hint=self.hint)


# -- the rules (pure) -------------------------------------------------------------------------------


def is_ipv6_address(host: str) -> bool:
    """ddtrace's ``is_ipv6_hostname``: a literal IPv6 address (without brackets)."""
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return False
    return True


def agent_url(s: RouteSettings, *, socket_path: str = DEFAULT_AGENT_SOCKET,
              exists: Callable[[str], bool] = os.path.exists) -> str:
    """The Agent's URL: ddtrace's ``_derive_trace_url`` (ddtrace/internal/settings/_agent.py)."""
    if s.trace_agent_url:
        return s.trace_agent_url
    if s.agent_host is not None or s.agent_port is not None:
        host = s.agent_host or DEFAULT_AGENT_HOST
        if is_ipv6_address(host):
            host = f"[{host}]"
        return f"http://{host}:{s.agent_port or DEFAULT_AGENT_PORT}"
    if exists(socket_path):
        return f"unix://{socket_path}"
    return f"http://{DEFAULT_AGENT_HOST}:{DEFAULT_AGENT_PORT}"


def llmobs_agentless(s: RouteSettings) -> bool | None:
    """Agentless, through the Agent, or ask the Agent (None): ``AgentlessConfig.llmobs`` (settings/_agentless.py)."""
    if s.llmobs_agentless is not None:
        return s.llmobs_agentless
    return True if s.agentless else None


def has_evp_proxy(endpoints: object) -> bool:
    """``should_use_agentless`` (llmobs/_writer.py): some endpoint of ``/info`` contains ``/evp_proxy/v2``."""
    if not isinstance(endpoints, list):
        return False
    return any(EVP_PROXY_PREFIX in endpoint for endpoint in endpoints if isinstance(endpoint, str))


def target(origin: str, path: str) -> tuple[str, str | None]:
    """The URL of ``path`` under ``origin`` and the UNIX socket to reach it through, if any.

    As ddtrace's HTTP client joins them: a ``unix://`` origin names the socket, and an ``http(s)`` origin's
    own path (a reverse-proxied Agent, ``http://gateway/datadog``) stays in front of ``path``.
    """
    parts = urlsplit(origin)
    if parts.scheme == "unix":
        return UDS_ORIGIN + "/" + path.lstrip("/"), parts.path
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return base + "/" + path.lstrip("/"), None


def decide(s: RouteSettings, agent: str, answer: AgentAnswer | None, *,
           origin_headers: Mapping[str, str] | None = None) -> IntakeRoute | NoRoute:
    """The route, from the settings and (when the settings leave it open) the Agent's answer."""
    chosen = llmobs_agentless(s)
    reason: Reason
    if chosen is not None:
        if s.llmobs_agentless is not None:
            reason = "llmobs_agentless_enabled" if chosen else "llmobs_agentless_disabled"
            why = f"DD_LLMOBS_AGENTLESS_ENABLED={'true' if chosen else 'false'}"
        else:
            reason, why = "agentless_enabled", "DD_AGENTLESS_ENABLED=true and DD_LLMOBS_AGENTLESS_ENABLED is not set"
    else:
        if answer is None:
            raise ValueError("the settings leave the route open: ask the Agent first (choose_route)")
        chosen, reason = not answer.evp_proxy, answer.reason
        why = f"the Datadog Agent at {agent} {answer.detail}"
        if chosen and not s.api_key:
            return NoRoute(reason=reason, agent=agent, why=f"{why}, and DD_API_KEY is not set for agentless delivery")
        if chosen:
            why += ", so agentless with DD_API_KEY"
    if chosen and not s.api_key:  # refused with the settings already (consumer.config); kept for direct callers
        return NoRoute(reason=reason, agent=agent, why=f"{why}, but DD_API_KEY is not set")
    origin = s.override_origin or (AGENTLESS_ORIGIN.format(site=s.site) if chosen else agent)
    path = EVAL_METRIC_PATH if chosen else EVP_PROXY_PREFIX + EVAL_METRIC_PATH
    if s.override_origin:
        override = urlsplit(s.override_origin)
        if override.scheme != "unix" and override.path not in ("/", ""):
            path = EVAL_METRIC_PATH  # BaseLLMObsWriter.__init__: "ENDPOINT.lstrip('/')" under the origin's path
    url, uds = target(origin, path)
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:  # e.g. an IPv6 address without brackets in DD_TRACE_AGENT_URL
        return NoRoute(reason=reason, agent=agent, why=f"{why}, but {url} is not a valid URL ({exc})",
                       hint=BAD_URL_HINT)
    headers = {"Content-Type": "application/json", **(origin_headers or {})}
    if chosen:
        headers["DD-API-KEY"] = s.api_key or ""
    else:
        headers["X-Datadog-EVP-Subdomain"] = EVP_SUBDOMAIN
    return IntakeRoute(kind="agentless" if chosen else "agent", reason=reason, why=why, agent=agent, url=url,
                       uds=uds, headers=headers)


# -- the container's identity -----------------------------------------------------------------------

# ddtrace/internal/runtime/container.py, CGroupInfo: the patterns of a container id at the end of a cgroup path
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}|([0-9a-f]{8}(-[0-9a-f]{4}){4}$)"
_CONTAINER = r"[0-9a-f]{64}"
_TASK = r"[0-9a-f]{32}-\d+"
_LINE_RE = re.compile(r"^(\d+):([^:]*):(.+)$")
_CONTAINER_RE = re.compile(rf"(?:.+)?({_UUID}|{_CONTAINER}|{_TASK})(?:\.scope)?$")
HOST_CGROUP_NAMESPACE_INODE = 0xEFFFFFFB  # vendor/dogstatsd/container.py: the host's cgroup namespace
_LOWEST_REAL_INODE = 3  # 0 is no inode, 1 a bad-block inode, 2 a file system's root


def container_headers(cgroup: str, *, host_namespace: bool,
                      inode_of: Callable[[str], int | None]) -> dict[str, str]:
    """The identity headers for a process whose ``/proc/self/cgroup`` reads ``cgroup``.

    ``inode_of(path)`` is the inode of the cgroup node ``path`` (under ``/sys/fs/cgroup``), None if absent.
    """
    for line in cgroup.splitlines():
        match = _LINE_RE.match(line.strip())
        if not match:
            continue
        path = match.group(3)
        found = _CONTAINER_RE.match(path.split("/")[-1])
        if found:
            return {CONTAINER_ID_HEADER: found.group(1), ENTITY_ID_HEADER: f"ci-{found.group(1)}"}
        if not host_namespace:
            inode = inode_of(path)
            if inode is not None and inode >= _LOWEST_REAL_INODE:
                return {ENTITY_ID_HEADER: f"in-{inode}"}
    return {}


def origin_headers(*, proc: Path = Path("/proc/self"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> dict[str, str]:
    """:func:`container_headers` of this process (none when it is not in a container, or not on Linux)."""
    try:
        cgroup = (proc / "cgroup").read_text()
    except OSError:
        return {}
    try:
        host_namespace = (proc / "ns" / "cgroup").stat().st_ino == HOST_CGROUP_NAMESPACE_INODE
    except OSError:
        host_namespace = False

    def inode_of(path: str) -> int | None:
        try:
            return (cgroup_root / path.strip("/")).stat().st_ino
        except OSError:
            return None

    return container_headers(cgroup, host_namespace=host_namespace, inode_of=inode_of)


# -- asking the Agent -------------------------------------------------------------------------------


async def ask_agent(agent: str, *, timeout_s: float = AGENT_INFO_TIMEOUT_S,
                    headers: Mapping[str, str] | None = None) -> AgentAnswer:
    """``GET {agent}/info`` (ddtrace/internal/agent.py, ``info``), over the Agent's socket for a ``unix://`` URL."""
    url, uds = target(agent, "/info")
    transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
    try:
        async with httpx.AsyncClient(transport=transport, timeout=timeout_s) as client:
            response = await client.get(url, headers={"Content-Type": "application/json", **(headers or {})})
    except httpx.HTTPError as exc:
        return AgentAnswer("agent_unreachable", f"is unreachable ({type(exc).__name__}: {exc})")
    except httpx.InvalidURL as exc:
        return AgentAnswer("agent_unreachable", f"cannot be reached: {url} is not a valid URL ({exc})")
    if not 200 <= response.status_code < 300:
        return AgentAnswer("agent_info_unavailable", f"answered HTTP {response.status_code} on /info")
    try:
        info = response.json()
    except ValueError:
        return AgentAnswer("agent_info_unavailable", "answered /info with something that is not JSON")
    endpoints = info.get("endpoints") if isinstance(info, dict) else None
    if has_evp_proxy(endpoints):
        return AgentAnswer("agent_has_evp_proxy", f"offers the EVP proxy ({EVP_PROXY_PREFIX})")
    return AgentAnswer("agent_without_evp_proxy", f"does not offer the EVP proxy ({EVP_PROXY_PREFIX} is not "
                       "among the endpoints of its /info)")


Ask = Callable[[str], Awaitable[AgentAnswer]]


async def choose_route(s: RouteSettings, *, ask: Ask | None = None,
                       identity: Mapping[str, str] | None = None) -> IntakeRoute | NoRoute:
    """The route, asking the Agent's ``/info`` only when the settings leave it open (as ddtrace does)."""
    agent = agent_url(s)
    headers = origin_headers() if identity is None else identity
    answer = None
    if llmobs_agentless(s) is None:
        answer = await (ask(agent) if ask is not None else ask_agent(agent, headers=headers))
    return decide(s, agent, answer, origin_headers=headers)


def log_route(route: IntakeRoute | NoRoute) -> None:
    """The one ``intake_route`` line: which route, and why."""
    if isinstance(route, NoRoute):
        log.error("intake_route", route="none", reason=route.reason, why=route.why, agent=route.agent,
                  hint=route.hint)
    else:
        log.info("intake_route", route=route.kind, reason=route.reason, why=route.why, intake=route.where,
                 agent=route.agent)


# -- the sink on the route --------------------------------------------------------------------------


class RoutedSink:
    """:class:`EvaluationSink` delivering on the route chosen at :meth:`start`.

    While there is no route, ``send`` waits (as it waits out an intake that fails), the service is not
    ready (a refusal of component ``intake``, with the reason), and the Agent is asked again, from
    ``RECHECK_FIRST_S`` doubling up to ``RECHECK_CAP_S``; the first route found is then used for good.
    """

    def __init__(self, settings: RouteSettings, *, open_sink: Callable[[IntakeRoute], EvaluationSink],
                 ask: Ask | None = None, recheck_first_s: float = RECHECK_FIRST_S,
                 recheck_cap_s: float = RECHECK_CAP_S) -> None:
        self._settings = settings
        self._open_sink = open_sink
        self._ask = ask
        self._recheck = (recheck_first_s, recheck_cap_s)
        self._sink: EvaluationSink | None = None
        self._found = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.route: IntakeRoute | NoRoute | None = None

    async def start(self, refusals: Refusals) -> IntakeRoute | NoRoute:
        """Choose the route (once) and log it; without one, report the refusal and keep looking."""
        route = await choose_route(self._settings, ask=self._ask)
        log_route(route)
        if isinstance(route, NoRoute):
            refusals.refused("intake_route", route.refusal())
            self.route = route
            self._task = asyncio.create_task(self._look_again(refusals), name="evaljoin-intake-route")
        else:
            self._use(route)
        return route

    async def send(self, metrics: Sequence[bytes], *, accepted: Accepted | None = None) -> list[Rejection]:
        await self._found.wait()
        assert self._sink is not None
        return await self._sink.send(metrics, accepted=accepted)

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._sink is not None:
            await self._sink.aclose()

    def _use(self, route: IntakeRoute) -> None:
        self.route = route
        self._sink = self._open_sink(route)
        self._found.set()

    async def _look_again(self, refusals: Refusals) -> None:
        backoff = Backoff(*self._recheck)
        while True:
            await asyncio.sleep(backoff.next())
            route = await choose_route(self._settings, ask=self._ask)
            if isinstance(route, IntakeRoute):
                log_route(route)
                self._use(route)
                refusals.cleared("intake_route")
                return
            if route != self.route:
                log_route(route)
                self.route = route
                refusals.refused("intake_route", route.refusal())
