"""The chaos run's fault schedule: seeded random faults of every kind, overlapping, the system kept recoverable.

:class:`Schedule` draws a fault every few seconds (:data:`GAP_S`) until its time is up. Each fault holds
the resources it disturbs while it lasts (a replica, the Kafka cluster, the Redis set, the intake, one
replica's intake link), and a fault is drawn only among the kinds whose resources are free; kinds that
have not happened yet are drawn first, so a short run still has one of each. Faults on different
resources overlap freely (a broker down while the Redis primary fails over, a replica is SIGKILLed and
the intake answers 500), and one resource never has two at once, which keeps the system recoverable:

* never two Kafka nodes down at once (topics have ``min.insync.replicas=2`` of 3): every Kafka fault waits
  until every replica is back in sync before it ends;
* never the Redis primary killed while a failover is unfinished: the fault ends once the sentinels agree
  on the new primary and the killed node is back as a replica in sync;
* a replica fault ends with the process started again; a SIGTERM must end it with exit 0. A SIGTERM waits
  until the process wrote its first log line: before ``consumer.__main__`` runs its first line (the
  interpreter's own start) nothing can handle the signal, and the default action ends it with -15 (as
  PID 1 in a container the kernel ignores it instead). SIGKILL strikes at any moment.

A process that exits when no fault touched it is restarted (as its orchestrator would) and noted in
:attr:`Schedule.unplanned_exits`; the scenario fails on it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from localenv.intake import FakeIntake
from localenv.kafka_cluster import KafkaCluster
from localenv.netfault import NetFault
from localenv.redis import RedisSentinelSet
from tests.reliability.harness import ServiceProcess, wait_for

GAP_S = (1.0, 4.0)  # seconds between two faults drawn


KINDS = ("replica SIGKILL + restart", "replica SIGTERM restart", "replicas rolling SIGTERM", "Kafka leader SIGKILL",
         "Kafka controller SIGKILL", "Kafka rolling restart", "Redis primary SIGKILL + failover", "intake 429 window",
         "intake 500 window", "intake hang", "intake link cuts", "intake link latency", "intake link blackhole",
         "Kafka link cuts", "Kafka link latency", "Kafka link blackhole")
KAFKA_BLACKHOLE_S = (12.0, 15.0)  # past the group session and the request timeout (10 s each): members are evicted


def tally_table(tally: Mapping[str, int]) -> str:
    """How many faults of each kind struck, as the lines of a small table (every kind, 0 included)."""
    lines = [f"{'fault':<36} {'count':>6}"]
    lines += [f"{name:<36} {tally.get(name, 0):>6}" for name in KINDS]
    return "\n".join(lines)


@dataclass
class Targets:
    """What the faults strike."""

    cluster: KafkaCluster
    redis: RedisSentinelSet
    intake: FakeIntake
    replicas: Sequence[ServiceProcess]
    intake_links: Sequence[NetFault]  # replica i's link to the intake
    kafka_links: Sequence[NetFault]  # node i's proxy: every replica's connections to that node cross it
    topics: Sequence[str]  # what a Kafka fault waits to be in sync again
    intake_timeout_s: float


@dataclass
class Kind:
    name: str
    resources: Callable[[random.Random], list[str] | None]  # what it holds, chosen now; None: nothing free fits
    run: Callable[[list[str], random.Random], Awaitable[str]]  # strikes, returns a description once over


@dataclass
class Schedule:
    targets: Targets
    rng: random.Random
    tally: Counter[str] = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)  # "at +s: kind: description", in the order they ended
    unplanned_exits: list[str] = field(default_factory=list)
    max_overlap: int = 0
    gap_s: tuple[float, float] = GAP_S
    _busy: set[str] = field(default_factory=set)
    _drawn: set[str] = field(default_factory=set)  # kinds drawn so far (the tally counts those that ended)
    _started: float = 0.0

    # -- the draw ---------------------------------------------------------------------------------------

    @property
    def kinds(self) -> list[Kind]:
        strikes = [
            (self._one_replica, self._replica_kill), (self._one_replica, self._replica_restart),
            (self._every_replica, self._replicas_rolling), (self._free("kafka"), self._kafka_leader_kill),
            (self._free("kafka"), self._kafka_controller_kill), (self._free("kafka"), self._kafka_rolling),
            (self._free("redis"), self._redis_primary_kill), (self._free("intake"), self._intake_failing(429)),
            (self._free("intake"), self._intake_failing(500)), (self._free("intake"), self._intake_hang),
            *[(self._one_link(kind), fault) for kind in ("intake", "kafka")
              for fault in (self._link_cuts, self._link_latency, self._link_blackhole)],
        ]
        return [Kind(name, resources, run) for name, (resources, run) in zip(KINDS, strikes, strict=True)]

    async def run(self, seconds: float) -> None:
        """Draw faults for ``seconds``, then wait for those still on to end (each ends by itself)."""
        self._started = time.monotonic()
        deadline = self._started + seconds
        running: set[asyncio.Task[None]] = set()
        kinds = self.kinds
        try:
            while time.monotonic() < deadline:
                await self._check(running)
                choices = [(kind, held) for kind in kinds if (held := kind.resources(self.rng)) is not None]
                if choices:
                    fresh = [(kind, held) for kind, held in choices if kind.name not in self._drawn]
                    kind, held = self.rng.choice(fresh or choices)
                    self._drawn.add(kind.name)
                    self._busy.update(held)
                    running.add(asyncio.create_task(self._strike(kind, held)))
                    self.max_overlap = max(self.max_overlap, len(running))
                await self._sleep_watching(self.rng.uniform(*self.gap_s), running)
            while running:
                await self._check(running)
                await self._sleep_watching(0.5, running)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _strike(self, kind: Kind, held: list[str]) -> None:
        try:
            what = await kind.run(held, self.rng)
            self.tally[kind.name] += 1
            self.events.append(f"+{time.monotonic() - self._started:.0f}s {kind.name}: {what}")
        finally:
            self._busy.difference_update(held)

    async def _check(self, running: set[asyncio.Task[None]]) -> None:
        """Raise a fault's failure; restart a replica that exited with no fault on it."""
        for task in [task for task in running if task.done()]:
            running.discard(task)
            task.result()
        for i, replica in enumerate(self.targets.replicas):
            if f"replica-{i}" not in self._busy and not replica.running():
                code = await replica.wait_exit(5)
                self.unplanned_exits.append(f"replica-{i} exited {code} at +{time.monotonic() - self._started:.0f}s")
                replica.start()

    async def _sleep_watching(self, seconds: float, running: set[asyncio.Task[None]]) -> None:
        if running:
            await asyncio.wait(running, timeout=seconds)
        else:
            await asyncio.sleep(seconds)

    def _free(self, resource: str) -> Callable[[random.Random], list[str] | None]:
        return lambda rng: None if resource in self._busy else [resource]

    def _one_replica(self, rng: random.Random) -> list[str] | None:
        free = [f"replica-{i}" for i in range(len(self.targets.replicas)) if f"replica-{i}" not in self._busy]
        return [rng.choice(free)] if free else None

    def _every_replica(self, rng: random.Random) -> list[str] | None:
        every = [f"replica-{i}" for i in range(len(self.targets.replicas))]
        return None if self._busy.intersection(every) else every

    def _one_link(self, kind: str) -> Callable[[random.Random], list[str] | None]:
        def pick(rng: random.Random) -> list[str] | None:
            count = len(self.targets.intake_links if kind == "intake" else self.targets.kafka_links)
            free = [f"{kind}-link-{i}" for i in range(count) if f"{kind}-link-{i}" not in self._busy]
            return [rng.choice(free)] if free else None

        return pick

    # -- the faults -------------------------------------------------------------------------------------

    def _replica(self, held: str) -> ServiceProcess:
        return self.targets.replicas[int(held.rsplit("-", 1)[1])]

    async def _replica_kill(self, held: list[str], rng: random.Random) -> str:
        replica = self._replica(held[0])
        await replica.kill()
        down = rng.uniform(0.5, 3.0)
        await asyncio.sleep(down)
        replica.start()
        return f"{held[0]} down {down:.1f}s"

    async def _sigterm(self, name: str) -> None:
        """SIGTERM once the process is past the interpreter's start (as an orchestrator stops a pod that started;
        SIGKILL strikes at any moment), then exit 0 is required, and a start again."""
        replica = self._replica(name)
        await wait_for(replica.logged_since_start, within=60, what=f"{name}'s first log line", alive=[replica])
        code = await replica.terminate()
        assert code == 0, f"{name}: SIGTERM ended it with exit {code}\n{replica.tail()}"
        replica.start()

    async def _replica_restart(self, held: list[str], rng: random.Random) -> str:
        await self._sigterm(held[0])
        return f"{held[0]} exit 0"

    async def _replicas_rolling(self, held: list[str], rng: random.Random) -> str:
        for name in held:
            await self._sigterm(name)
            await asyncio.sleep(rng.uniform(1.0, 3.0))
        return "every replica exit 0"

    async def _kafka_kill(self, node_id: int, rng: random.Random) -> str:
        node = self.targets.cluster.node(node_id)
        struck = time.monotonic()
        node.kill()
        await asyncio.sleep(rng.uniform(2.0, 6.0))
        await asyncio.to_thread(node.restart)
        await self.targets.cluster.await_in_sync(self.targets.topics)
        return f"node {node_id}, back in sync after {time.monotonic() - struck:.0f}s"

    async def _kafka_leader_kill(self, held: list[str], rng: random.Random) -> str:
        inputs = list(self.targets.topics[:2])
        return await self._kafka_kill(await self.targets.cluster.abusiest_leader(inputs), rng)

    async def _kafka_controller_kill(self, held: list[str], rng: random.Random) -> str:
        return await self._kafka_kill((await self.targets.cluster.aquorum()).leader_id, rng)

    async def _kafka_rolling(self, held: list[str], rng: random.Random) -> str:
        struck = time.monotonic()
        for node in self.targets.cluster.nodes:
            await asyncio.to_thread(node.restart)  # SIGTERM: a controlled shutdown
            await self.targets.cluster.await_in_sync(self.targets.topics)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
        return f"3 nodes in {time.monotonic() - struck:.0f}s"

    async def _redis_primary_kill(self, held: list[str], rng: random.Random) -> str:
        redis = self.targets.redis
        struck = time.monotonic()
        old = await asyncio.to_thread(redis.kill_primary)
        new = await asyncio.to_thread(redis.wait_for_failover, old)
        failover_s = time.monotonic() - struck
        await asyncio.sleep(rng.uniform(0.0, 3.0))
        await asyncio.to_thread(redis.restart_node, old)
        await asyncio.to_thread(redis.wait_for_replicas, 2)
        return f"{old} -> {new} in {failover_s:.1f}s, {old} back as a replica"

    def _intake_failing(self, status: int) -> Callable[[list[str], random.Random], Awaitable[str]]:
        async def window(held: list[str], rng: random.Random) -> str:
            seconds = rng.uniform(2.0, 8.0)
            self.targets.intake.fail_next(1_000_000, status, retry_after=0.5 if status == 429 else None)
            await asyncio.sleep(seconds)
            self.targets.intake.fail_next(0)
            return f"{seconds:.1f}s"

        return window

    async def _intake_hang(self, held: list[str], rng: random.Random) -> str:
        count = rng.randint(2, 6)
        self.targets.intake.hang_next(count, self.targets.intake_timeout_s + 1.5)
        await asyncio.sleep(self.targets.intake_timeout_s + 2.0)
        self.targets.intake.hang_next(0, 0)
        return f"next {count} requests past the timeout"

    def _link(self, held: str) -> NetFault:
        links = self.targets.intake_links if held.startswith("intake") else self.targets.kafka_links
        return links[int(held.rsplit("-", 1)[1])]

    async def _link_cuts(self, held: list[str], rng: random.Random) -> str:
        link, count = self._link(held[0]), rng.randint(2, 6)
        for _ in range(count):
            link.cut(rst=rng.random() < 0.75)
            await asyncio.sleep(rng.uniform(0.3, 1.2))
        return f"{held[0]}: {count} cuts"

    async def _link_latency(self, held: list[str], rng: random.Random) -> str:
        link, delay, seconds = self._link(held[0]), rng.uniform(0.2, 0.5), rng.uniform(3.0, 8.0)
        link.add_latency(delay, jitter=0.1)
        await asyncio.sleep(seconds)
        link.normal()
        return f"{held[0]}: {delay * 1000:.0f} ms each way for {seconds:.1f}s"

    async def _link_blackhole(self, held: list[str], rng: random.Random) -> str:
        link = self._link(held[0])
        seconds = (self.targets.intake_timeout_s * rng.uniform(1.5, 3.0) if held[0].startswith("intake")
                   else rng.uniform(*KAFKA_BLACKHOLE_S))
        link.blackhole()
        await asyncio.sleep(seconds)
        link.normal()
        return f"{held[0]}: {seconds:.1f}s"
