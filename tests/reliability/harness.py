"""What every fault-injection scenario needs: known traffic, the real process, and a pair-by-pair account.

* :func:`make_pairs` generates N span/result pairs with known ids, so every evaluation the intake
  should receive is known in advance as ``(span_id, label)``.
* :class:`ServiceProcess` runs ``python -m consumer`` as a child process whose environment is built
  from a :class:`~consumer.config.Settings`, exactly as it is deployed.
* :func:`account` compares what was expected with what the intake accepted (every copy, byte for
  byte), the dead-letter topic and the unmatched topic, and :func:`report` prints it as one row of
  the results table.

``RELIABILITY_SCALE`` (default 1) multiplies the size of every scenario; ``RELIABILITY_RESULTS``
names a file that each row is also appended to, as a JSON line (``python -m tests.reliability``
uses it to print the table of a whole run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from consumer.config import Settings
from consumer.service import STOP_DEADLINE_MARGIN_S
from localenv.intake import FakeIntake
from tests.hostile import ID_HEADER, Hostile, has_raw_name, send_raw
from tests.support import eventually, group_lag

REPO_ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("RELIABILITY_SCALE") or 1)
RESULTS_ENV = "RELIABILITY_RESULTS"

Message = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]  # topic, key, value, headers
EvalKey = tuple[str, str]  # (span_id, label): one evaluation the intake should receive


def scaled(n: int, *, minimum: int = 1) -> int:
    """``n`` times ``RELIABILITY_SCALE``, at least ``minimum``."""
    return max(minimum, round(n * SCALE))


def timeout_for(base_seconds: float) -> int:
    """A per-test timeout that grows with the scale (the 2-core CI machine is shared; keep it generous)."""
    return int(base_seconds * max(1.0, SCALE))


# -- traffic ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One span-context event and the NeMo result event that joins it."""

    index: int
    join_key: str
    span_id: str
    event_id: str
    labels: tuple[str, ...]
    span: dict[str, Any]
    result: dict[str, Any]

    @property
    def eval_keys(self) -> list[EvalKey]:
        return [(self.span_id, label) for label in self.labels]

    def messages(self, span_topic: str, result_topic: str, *, headers: list[tuple[str, bytes]] | None = None,
                 ) -> list[Message]:
        key = self.join_key.encode()
        return [(span_topic, key, orjson.dumps(self.span), list(headers or [])),
                (result_topic, key, orjson.dumps(self.result), list(headers or []))]


def make_pairs(n: int, *, run: str, labels: Sequence[str] = ("faithfulness",), span_base: int = 10_000_000,
               ml_app: str | None = None) -> list[Pair]:
    """``n`` pairs with known ids; pair ``i`` carries one evaluation per label of ``labels``."""
    pairs = []
    for i in range(n):
        key, span_id, event_id = f"{run}-q{i:06d}", str(span_base + i), f"{run}-evt-{i:06d}"
        span: dict[str, Any] = {"schema_version": 1, "join_key": key, "trace_id": f"{span_base + i:032x}",
                                "span_id": span_id, "emitted_at_ms": 1_763_900_000_000 + i}
        result: dict[str, Any] = {
            "schema_version": 1, "event_id": event_id, "join_key": key,
            "evaluations": [{"label": label, "metric_type": "score", "value": (i % 100) / 100,
                             "reasoning": f"pair {i}", "timestamp_ms": 1_763_900_100_000 + i} for label in labels],
            "provenance": {"job_id": f"{run}-job", "target_type": "model"},
        }
        if ml_app:
            span["ml_app"] = result["ml_app"] = ml_app
        pairs.append(Pair(i, key, span_id, event_id, tuple(labels), span, result))
    return pairs


def interleave(pairs: Iterable[Pair], span_topic: str, result_topic: str, rng: random.Random) -> list[Message]:
    """Both sides of every pair, each pair in a random order (result first about half the time)."""
    messages: list[Message] = []
    for pair in pairs:
        both = pair.messages(span_topic, result_topic)
        rng.shuffle(both)
        messages.extend(both)
    return messages


async def publish(producer: AIOKafkaProducer, messages: Sequence[Message], *, chunk: int = 2000) -> None:
    """Send in order without waiting for each acknowledgement, then wait for all of them.

    A record with a header name that is not UTF-8 (:class:`tests.hostile.RawName`) goes below the client's string
    API, as a batch of its own on a partition of its key."""
    for start in range(0, len(messages), chunk):
        pending: list[Awaitable[Any]] = []
        for topic, key, value, headers in messages[start:start + chunk]:
            if has_raw_name(headers):
                partitions = sorted(producer._metadata.partitions_for_topic(topic) or {0})
                partition = partitions[zlib.crc32(key or b"") % len(partitions)]
                pending.append(await send_raw(producer, topic, value, key=key, headers=headers, partition=partition))
                continue
            pending.append(await producer.send(topic, value, key=key, headers=headers or None))
        await asyncio.gather(*pending)


# -- the process --------------------------------------------------------------------------------------


def service_env(settings: Settings) -> dict[str, str]:
    """The child's environment: every Settings field under its upper-case variable name, JSON logs."""
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in Settings.model_fields and name != "EVALJOIN_SECRETS_DIR"}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env["LOG_FORMAT"] = "json"
    return env


class ServiceProcess:
    """``python -m consumer`` as a child process; restarts append to one log file."""

    def __init__(self, settings: Settings, log_path: Path, **env: str) -> None:
        self.settings = settings
        self._env = {**service_env(settings), **env}
        # SIGUSR1 makes the child print its asyncio tasks' stacks (see dump_stacks).
        hook = log_path.parent / f"{log_path.stem}-hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(_TASK_DUMP_HOOK)
        self._env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), self._env.get("PYTHONPATH")]))
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_codes: list[int] = []
        self.cpu_seen: float | None = None  # the last CPU time sampled while waiting for the exit

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        assert not self.running(), "the previous process still runs"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts}\n".encode())
            log.flush()
            self._proc = subprocess.Popen([sys.executable, "-m", "consumer"], cwd=REPO_ROOT, env=self._env,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure_running(self) -> None:
        if not self.running():
            code = None if self._proc is None else self._proc.returncode
            raise AssertionError(f"the service exited unexpectedly with {code}\n{self.tail()}")

    def signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        self._proc.send_signal(sig)

    async def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        self.signal(signal.SIGKILL)
        code = await self.wait_exit(10)
        assert code == -signal.SIGKILL, f"SIGKILL: exit {code}\n{self.tail()}"

    async def terminate(self, within: float | None = None) -> int | None:
        """SIGTERM and wait for the exit; returns the exit code (None if it did not exit in time).

        By default it waits past the service's own stop deadline, so a stuck stop shows as the exit code
        ``EXIT_STUCK`` with ``stop_deadline_passed`` (every stack) in the log.
        """
        self.signal(signal.SIGTERM)
        code = await self.wait_exit(within if within is not None
                                    else self.settings.shutdown_timeout_seconds + STOP_DEADLINE_MARGIN_S + 5)
        if code is None:
            self.dump_stacks()
        return code

    def dump_stacks(self) -> None:
        """Append the stacks of a stuck process to its log: its asyncio tasks, and its threads with py-spy."""
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            return
        dump = subprocess.run([spy, "dump", "--pid", str(self._proc.pid)], capture_output=True, text=True,
                              timeout=60, check=False)
        with self.log_path.open("a") as log:
            log.write(f"=== stacks of the stuck process\n{dump.stdout}{dump.stderr}\n")

    async def wait_exit(self, within: float) -> int | None:
        assert self._proc is not None
        deadline = time.monotonic() + within
        while self._proc.poll() is None:
            self.cpu_seen = self.cpu_seconds() or self.cpu_seen
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        self.exit_codes.append(self._proc.returncode)
        return self._proc.returncode

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time of the running process (from /proc), or None where unavailable."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # fields after the command name, from the state on
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def until(self, check: Callable[[], Any], *, within: float, what: str, expect: Any = True) -> None:
        """``eventually`` that fails fast if the service dies, with the log tail in the message."""

        def alive_check() -> Any:
            self.ensure_running()
            return check()

        try:
            await eventually(alive_check, expect=expect, within=within, what=what)
        except AssertionError as exc:
            if "exited unexpectedly" in str(exc):
                raise
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def kill_if_running(self) -> None:
        """For finally blocks: never leave a child behind."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no service log)"
        return f"--- {self.log_path.name} tail ---\n" + "\n".join(text.splitlines()[-lines:])

    def logged_since_start(self) -> bool:
        """True once the latest start wrote a log line: past the interpreter's start, its stop handlers installed
        (``consumer.__main__`` installs them before anything else; a SIGTERM earlier ends it with -15)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return False
        marker = f"=== start {self.starts}\n"
        return marker in text and bool(text.rsplit(marker, 1)[1].strip())

    def log_events(self, event: str) -> int:
        """How many JSON log lines (over every start) have this ``event``."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count(f'"event": "{event}"') + text.count(f'"event":"{event}"')


# Imports nothing that signal and sys do not already need: the interpreter's start, before ``consumer.__main__``
# installs its stop handlers, stays as short as it is without the hook (a SIGTERM then still ends the process
# with the default action, -15).
_TASK_DUMP_HOOK = '''
import signal, sys

def _dump_tasks(signum, frame):
    asyncio = sys.modules.get("asyncio")
    loop = None if asyncio is None else asyncio._get_running_loop()
    if loop is None:
        return
    print("=== asyncio tasks", file=sys.stderr)
    for task in asyncio.all_tasks(loop):
        task.print_stack(limit=30, file=sys.stderr)
    sys.stderr.flush()

signal.signal(signal.SIGUSR1, _dump_tasks)
'''


async def wait_for(check: Callable[[], Any], *, within: float, what: str, expect: Any = True,
                   alive: Sequence[ServiceProcess] = (), interval: float = 0.25) -> float:
    """Poll ``check`` (sync or async) until it returns ``expect``; fail fast if a process in ``alive`` died.

    Returns the seconds it took.
    """
    started = time.monotonic()
    while True:
        for process in alive:
            process.ensure_running()
        outcome = check()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome == expect:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            tails = "\n".join(process.tail() for process in alive)
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what} (last: {outcome!r})\n{tails}")
        await asyncio.sleep(interval)


async def lag_or_none(bootstrap: str, settings: Settings) -> int | None:
    """The group's lag on both input topics; None while the broker cannot tell."""
    try:
        return await asyncio.wait_for(
            group_lag(bootstrap, settings.kafka_group_id, [settings.span_topic, settings.result_topic]), 20)
    except (KafkaError, OSError, TimeoutError):
        return None


# -- what arrived -------------------------------------------------------------------------------------


def raw_metrics(body: bytes) -> list[str]:
    """The JSON text of each metric in an intake request body, exactly as it was sent."""
    text = body.decode()
    position = text.index('"metrics":[') + len('"metrics":[')
    decoder = json.JSONDecoder()
    out: list[str] = []
    while text[position] != "]":
        _, end = decoder.raw_decode(text, position)
        out.append(text[position:end])
        position = end + 1 if text[end] == "," else end
    return out


def metric_key(metric: dict[str, Any]) -> EvalKey:
    return str(metric["join_on"]["span"]["span_id"]), str(metric["label"])


def delivered_keys(intake: FakeIntake) -> set[EvalKey]:
    """Distinct evaluations the intake accepted so far (cheap enough to poll)."""
    return {metric_key(m) for r in intake.requests if 200 <= r.status < 300 for m in r.metrics}


async def drain_topic(bootstrap: str, topic: str, *, within: float = 60.0) -> list[Any]:
    """Every record of ``topic`` up to its current end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_partition_fetch_bytes=32 * 1_048_576,
                                fetch_max_bytes=64 * 1_048_576)
    await consumer.start()
    records: list[Any] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + within
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: {len(records)} records read after {within}s, end offsets {ends}")
            for partition_records in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(partition_records)
    finally:
        await consumer.stop()
    return records


def header(record: Any, name: str) -> bytes | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value) if value is not None else None
    return None


def dead_letter_problems(dlq: Sequence[Any], sent: Mapping[str, tuple[Hostile, frozenset[str]]]) -> list[str]:
    """Each hostile record sent (by its ``ID_HEADER`` id: the example and the reasons right for it) on the DLQ with
    one of those reasons and a detail; nothing else there. A batch done again may add copies of a record."""
    by_id: dict[str, list[Any]] = defaultdict(list)
    for record in dlq:
        by_id[(header(record, ID_HEADER) or b"?").decode()].append(record)
    problems: list[str] = []
    for record_id, (example, reasons) in sent.items():
        records = by_id.get(record_id, [])
        if not records:
            problems.append(f"{record_id} ({example.category}) is not in the DLQ: {example.value!r:.300}")
            continue
        reason = (header(records[0], "evaljoin.error") or b"").decode()
        if reason not in reasons:
            problems.append(f"{record_id} ({example.category}) dead-lettered as {reason!r}, expected one of "
                            f"{sorted(reasons)}: {example.value!r:.300}")
        if not header(records[0], "evaljoin.error.detail"):
            problems.append(f"{record_id} ({example.category}) has no detail")
    problems += [f"record {record_id} is not a hostile record sent, but was dead-lettered as "
                 f"{header(records[0], 'evaljoin.error')!r}" for record_id, records in by_id.items()
                 if record_id not in sent]
    return problems


@dataclass
class Outcome:
    """One scenario's account, pair by pair."""

    scenario: str
    expected: int  # evaluations that must reach the intake, or the DLQ when the intake refuses them
    delivered: int  # distinct expected evaluations the intake accepted
    lost: int  # expected evaluations found neither at the intake nor (when refused) in the DLQ
    duplicates: int  # extra accepted copies of an evaluation
    mismatched: int  # extra copies whose bytes differ from the first copy (must be 0)
    dead_lettered: int  # records on the DLQ topic
    unmatched: int  # reports on the unmatched topic
    recover_s: float | None  # from the end of the last fault to everything delivered and committed
    unexpected: int = 0  # evaluations accepted that nobody published, or refused ones that were accepted
    notes: dict[str, Any] = field(default_factory=dict)


def account(scenario: str, *, expected: Iterable[EvalKey], intake: FakeIntake, dlq: Sequence[Any],
            unmatched: Sequence[Any], refused: Iterable[EvalKey] = (), recover_s: float | None = None,
            **notes: Any) -> Outcome:
    """Compare what must arrive with every copy the intake accepted and with the DLQ.

    ``expected`` must be accepted by the intake; ``refused`` must instead be on the DLQ as
    ``intake_rejected`` (and never accepted).
    """
    must_arrive, must_be_refused = set(expected), set(refused)
    copies: dict[EvalKey, list[str]] = defaultdict(list)
    for request in intake.requests:
        if not 200 <= request.status < 300:
            continue
        for text in raw_metrics(request.body):
            copies[metric_key(json.loads(text))].append(text)
    refused_in_dlq = {metric_key(orjson.loads(record.value)) for record in dlq
                      if header(record, "evaljoin.error") == b"intake_rejected"}
    delivered = must_arrive & copies.keys()
    lost = len(must_arrive - copies.keys()) + len(must_be_refused - refused_in_dlq)
    duplicates = sum(len(sent) - 1 for sent in copies.values())
    mismatched = sum(text != sent[0] for sent in copies.values() for text in sent[1:])
    unexpected = len(copies.keys() - must_arrive)
    return Outcome(scenario, len(must_arrive) + len(must_be_refused), len(delivered), lost, duplicates, mismatched,
                   len(dlq), len(unmatched), recover_s, unexpected, dict(notes))


COLUMNS = ("scenario", "expected", "delivered", "lost", "duplicates", "dead-lettered", "unmatched", "recover_s")
_WIDTHS = (44, 9, 10, 5, 11, 14, 10, 10)


def table_header() -> str:
    return " | ".join(name.ljust(width) for name, width in zip(COLUMNS, _WIDTHS, strict=True))


def table_row(outcome: Outcome | dict[str, Any]) -> str:
    row = asdict(outcome) if isinstance(outcome, Outcome) else outcome
    recover = row["recover_s"]
    cells = (row["scenario"], row["expected"], row["delivered"], row["lost"],
             f"{row['duplicates']}" + (f" ({row['mismatched']} differ)" if row["mismatched"] else ""),
             row["dead_lettered"], row["unmatched"], "-" if recover is None else f"{recover:.1f}")
    return " | ".join(str(cell).ljust(width) for cell, width in zip(cells, _WIDTHS, strict=True))


def report(outcome: Outcome) -> None:
    """Print the row (``pytest -s`` shows it) and append it to ``$RELIABILITY_RESULTS`` if set."""
    notes = ", ".join(f"{key}={value}" for key, value in outcome.notes.items())
    print(f"\n{table_header()}\n{table_row(outcome)}" + (f"\n  ({notes})" if notes else ""))
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(outcome)) + "\n")


def assert_guarantees(outcome: Outcome, *, allow_loss: bool = False) -> None:
    """Nothing lost (unless the scenario only measures loss), duplicates byte-identical, nothing made up."""
    if not allow_loss:
        assert outcome.lost == 0, f"{outcome.scenario}: {outcome.lost} evaluations lost ({outcome})"
    assert outcome.mismatched == 0, f"{outcome.scenario}: {outcome.mismatched} re-sent copies differ from the first"
    assert outcome.unexpected == 0, f"{outcome.scenario}: {outcome.unexpected} evaluations nobody published"
