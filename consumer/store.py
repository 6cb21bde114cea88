"""The join buffer's contract: where the side that arrives first waits for the other.

Three small protocols, each for the step that uses it:

- :class:`JoinStore`: the join and delivery steps (store sides, claim and settle evaluations).
- :class:`DeadlineIndex`: the expiry path (sides whose deadline passed, the sweeper's locks).
- :class:`Inspectable`: the operators' CLI (one join key decoded, counts per ml_app).

:mod:`consumer.store_redis` implements them on Redis or Redis Cluster; :mod:`consumer.store_memory`
in memory, with the same semantics, for unit tests. Both keep records as the caller encoded them
(:mod:`consumer.records`), so what one returns the other returns too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, overload
from urllib.parse import quote, unquote

import orjson

# replaced: the key's next answer (no run); quota: its ml_app's buffer quota is used up, not stored (AppQuotas)
SpanStatus = Literal["stored", "duplicate", "conflict", "replaced", "quota"]
# waiting: buffered although a span is here, since it repeats one of that span's evaluations (no run);
# full: too many results wait for the span; tagged: no span is here and the result joins by span tag (not stored)
ResultStatus = Literal["joined", "buffered", "waiting", "duplicate", "full", "tagged", "quota", "later"]
ClaimVerdict = Literal["new", "done", "busy"]
ExpireVerdict = Literal["report", "dropped", "busy", "gone"]


SLOT_CHARS = 8  # an evaluation slot, and a result's digest in a span's book: hex characters of a SHA-1


@dataclass(frozen=True)
class AppQuotas:
    """How much of the buffer each ml_app may hold: buffered sides and their bytes (0: no limit).

    A side counts from when it is stored until it leaves the join (its span or result is dropped, or the
    sweeper takes it out to report it): spans (also a replaced one, kept for its late results) and results
    in the pending hash. Its bytes are what Redis holds as its value (the record, and a span's book).
    Only a side that would wait without joining anything is refused over the quota (status ``quota``): a
    span that takes results, and a result that joins its span, always go through, since they end waits.
    """

    sides: int = 0
    bytes: int = 0
    per_app: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # ml_app -> (sides, bytes); -1: default

    def of(self, ml_app: str) -> tuple[int, int]:
        """(sides, bytes) ``ml_app`` may hold; 0 for no limit."""
        sides, size = self.per_app.get(ml_app, (-1, -1))
        return (self.sides if sides < 0 else sides, self.bytes if size < 0 else size)

    @property
    def enabled(self) -> bool:
        return bool(self.sides or self.bytes or any(s > 0 or b > 0 for s, b in self.per_app.values()))


@dataclass(frozen=True)
class AppUsage:
    """What one ml_app holds in the buffer now (see :class:`AppQuotas` for what counts)."""

    sides: int
    bytes: int


_UNQUOTED = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch  # what quote(..., safe="") leaves as it is


def _quoted(text: str) -> str:
    """``quote(text, safe="")``, without its cost for the common name that needs no quoting."""
    return text if _UNQUOTED(text) else quote(text, safe="")


class _computed_once:  # a decorator, like the functools.cached_property it replaces
    """A property computed on first access and then kept in the instance: functools.cached_property without its
    lock (Python 3.11 takes one on every first access, which cost more than the value for a namespace per record)."""

    def __init__(self, func: Callable[[Any], str]) -> None:
        self._func = func
        self._name = func.__name__

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _computed_once: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> str: ...

    def __get__(self, instance: object, owner: type | None = None) -> str | _computed_once:
        if instance is None:
            return self
        value = instance.__dict__[self._name] = self._func(instance)
        return value


class _NamespaceFields(NamedTuple):
    ml_app: str
    join_key: str
    run: str = ""


class Namespace(_NamespaceFields):
    """One join key inside one ml_app and, when the events name one, inside one run.

    Keys of different apps, or of different runs, never collide. A namespace without a run has the
    tag (and so the Redis keys) it had before runs existed.

    An immutable tuple: built, hashed and compared in C (a frozen dataclass took 2 to 4 times as long, and a
    namespace is built twice and keys half a dozen dict look-ups per record). A subclass of the tuple, so that
    it has an instance dict to keep its ``tag`` in.
    """

    @_computed_once
    def tag(self) -> str:  # cached: every key of a namespace starts with it, several per record
        tag = f"{_quoted(self.ml_app)}:{_quoted(self.join_key)}"
        return f"{tag}:{_quoted(self.run)}" if self.run else tag

    @classmethod
    def from_tag(cls, tag: str) -> Namespace:
        app, _, rest = tag.partition(":")
        key, _, run = rest.partition(":")
        return cls(unquote(app), unquote(key), unquote(run))


def evaluation_slot(label: str, tags: Mapping[str, str], origin: Mapping[str, Any] | None = None) -> str:
    """What an evaluation is of an answer, as :data:`SLOT_CHARS` hex characters: its label, its tags, and its
    ``origin``, what made it that stays the same from run to run (a result's provenance but its job id and time).

    Without a run, an answer (span) takes each slot once: a second result with an evaluation in a
    slot the span already has is the evaluation of the key's next answer (see :meth:`JoinStore.put_many`);
    two judges of one answer under one label, told apart by a tag or their provenance, are not.
    """
    canonical = orjson.dumps([label, tags, origin or {}], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha1(canonical, usedforsecurity=False).hexdigest()[:SLOT_CHARS]


def result_digest(event_id: str) -> str:
    """A result's name in a span's book: the first :data:`SLOT_CHARS` hex characters of SHA-1(event_id).

    The Lua scripts compute the same with ``redis.sha1hex``.
    """
    return hashlib.sha1(event_id.encode(), usedforsecurity=False).hexdigest()[:SLOT_CHARS]


# The values built per record or per evaluation below are NamedTuples, not frozen dataclasses: as immutable, but
# built in C. A frozen dataclass's __init__ sets each field through object.__setattr__ (1.8 us for eight fields,
# against 0.2 for a tuple), and the join step builds several per record.


class SpanOp(NamedTuple):
    """Store a span under its namespace, or recognise it (one item of :meth:`JoinStore.put_many`)."""

    ns: Namespace
    identity: str  # records.span_identity(trace_id, span_id)
    record: bytes  # records.encode_span(...)
    deadline_ms: int
    # the ml_app joins by span tag: a span that finds its key's evaluations delivered already (by tag) is joined
    by_tag: bool = False


class ResultOp(NamedTuple):
    """Join a result with its span, or buffer it until the span comes (one item of :meth:`JoinStore.put_many`)."""

    ns: Namespace
    event_id: str
    record: bytes  # records.encode(...); b"": not encoded, "later" if it would be stored (see put_many)
    eval_ids: Sequence[str]  # a result whose every evaluation is finished is not buffered again
    deadline_ms: int
    # evaluation_slot() of each evaluation, each once; empty in a namespace with a run, where no answer repeats
    slots: Sequence[str] = ()
    # the ml_app joins by span tag: without a span here the result is "tagged" (delivered joined by tag), not stored
    by_tag: bool = False


class SpanPut(NamedTuple):
    status: SpanStatus
    pending: dict[str, bytes]  # event_id -> result record, results that now join this span
    existing: bytes | None = None  # on conflict: the span already bound to the key, identity, "\n", body


class ResultPut(NamedTuple):
    status: ResultStatus
    span: bytes | None = None  # when joined: the span, identity, "\n", body


class Settle(NamedTuple):
    """One namespace's part of a :meth:`JoinStore.settle_many`: evaluations finished, results to drop."""

    ns: Namespace
    delivered: Sequence[str] = ()
    dead_lettered: Sequence[str] = ()
    drop_event_ids: Sequence[str] = ()  # results whose every evaluation is finished


@dataclass(frozen=True)
class DueSide:
    """A deadline-index entry that is due: a span (``event_id`` None) or one result."""

    shard: int
    member: str  # the entry's name in its shard; opaque to callers
    deadline_ms: int
    namespace: Namespace
    event_id: str | None


@dataclass(frozen=True)
class ExpireOutcome:
    verdict: ExpireVerdict
    body: bytes | None = None  # a result's record, or a span's identity, "\n", body


Readable = dict[str, Any] | str  # a decoded record, or, if this version cannot read it, its text as stored

LEDGER_NAMES = {"d": "delivered", "x": "dead-lettered"}  # ledger states as stored -> as shown


@dataclass(frozen=True)
class KeyState:
    """Everything stored for one join key, decoded for people to read."""

    span: Readable | None
    span_joined: bool  # a result joined the span, so its deadline passes without a report
    pending_results: dict[str, Readable]  # event_id -> result waiting for a span, or taken and not delivered
    ledger: dict[str, str]  # eval_id -> "delivered" | "dead-lettered" | "in flight"
    being_reported: list[str]  # sides the sweeper took out and reports: "s" the span, "r:<event_id>" a result
    replaced_span: Readable | None = None  # the key's earlier answer, which the span replaced (without a run)
    waiting: list[str] = field(default_factory=list)  # pending results no span took: they wait for the next one


class JoinStore(Protocol):
    """What the join and delivery steps need from the buffer.

    A successful return from :meth:`put_many` means every side it reports as stored, buffered or
    duplicate is stored as durably as the backing store is configured to be (for Redis: AOF with
    ``appendfsync always`` makes it survive a crash); only then may the Kafka offsets of their
    messages be committed. A return from :meth:`settle_many` means the ledger records the
    evaluations as finished, just as durably. Every method is idempotent for the same arguments, so
    a redelivered message may call it again; an exception means nothing can be assumed (part of a
    batch may be stored), and the same call may be repeated.
    """

    async def put_many(self, ops: Sequence[SpanOp | ResultOp]) -> list[SpanPut | ResultPut]:
        """Store each span or result, or recognise it again; one reply per op, in order.

        Ops of one namespace take effect in the order given, as if put one by one; ops of different
        namespaces are independent. A span that is ``stored``, ``replaced`` or ``duplicate`` returns
        the results it takes (again on a duplicate: they may not have been delivered before a
        crash); a ``conflict`` (another span is bound to the key) is not stored. A result is
        ``joined`` (not stored: the span came back with it), ``buffered`` until its deadline (no span
        is here), ``waiting`` (buffered while a span is here: see below), ``duplicate`` (waiting
        already, or all its evaluations are finished), or ``full``: the key already has as many
        results waiting as the store allows, and it is not stored. Stored, replaced and duplicate
        sides are in the deadline index no earlier than their ``deadline_ms``.

        With a quota (:class:`AppQuotas`), a side that would wait without joining anything (a span that takes
        no result, ``stored`` or ``replaced``; a result ``buffered`` or ``waiting``) while its ml_app holds
        its quota of sides or bytes is ``quota`` instead: not stored, not indexed; the caller reports it.

        A result op ``by_tag`` (its ml_app joins by span tag) that finds no span is ``tagged`` instead of
        ``buffered``: it is not stored (nor indexed), and the caller delivers it joined by tag; a copy
        of it that waited from before is left in place, for the caller to drop once it is delivered.
        It is ``duplicate`` if its every evaluation is finished, or the sweeper is reporting it. With
        a span here it joins (or waits) as any result. A span op ``by_tag`` that is stored without
        taking a result, for a key whose ledger has entries (its results were delivered by tag before
        it came), is stored as joined, so that its deadline passes without a report.

        A result op whose ``record`` is empty (not encoded: the caller expects its span to be here) that would
        be stored (``buffered`` or ``waiting``) is ``later`` instead: nothing is changed, and the caller puts it
        again with its record. Encoding a record costs more than the rest of its put, and a result whose span
        is here is never stored.

        A result op with ``slots`` (a namespace without a run, where one join key may name one answer
        after another) follows the repeated-key rule; one without (a run names the answer) joins
        whatever span is bound to its key:

        - A span takes each slot once. A result joins the span if none of its slots is taken on it
          and no result that waits for a span holds one of them; else it is the evaluation of the
          key's next answer and is ``waiting``. A result the span (or the span it replaced) took
          before joins that span again, whatever came since.
        - A span arriving takes the waiting results whose slots no other waiting result shares
          (two that share one cannot be told apart: they keep waiting, until their deadline).
        - A different span for a key whose span took at least one result is the key's next answer:
          it ``replaced`` that span, which is kept (with what it took) until the new one's deadline
          so that its results, redelivered, still join it. A different span for a key whose span
          took none is a ``conflict``: which of the two a later result is for cannot be told. So
          is one whose replaced span still has taken results waiting to be delivered.
        """
        ...

    async def claim_many(self, requests: Sequence[tuple[Namespace, Sequence[str]]], *, owner: str, now_ms: int,
                         lease_ms: int) -> list[list[ClaimVerdict]]:
        """Claim evaluations for delivery until ``now_ms + lease_ms``; one verdict per evaluation id, per request.

        ``new``: the caller holds the claim now (also when it held it already, or another owner's
        lease ended), and may send it. ``busy``: another owner's lease is live; wait and claim again.
        ``done``: delivered or dead-lettered already; never send it.
        """
        ...

    async def settle_many(self, requests: Sequence[Settle]) -> None:
        """Record evaluations as finished (2xx, or dead-letter acknowledged), then drop the finished results.

        From the return on, a claim of these evaluations says ``done``, and a span redelivered no
        longer returns the dropped results.
        """
        ...

    async def ping(self) -> bool:
        """True if the store answers (for the readiness probe); no data is read or written."""
        ...


class DeadlineIndex(Protocol):
    """What the expiry path needs: the sides whose deadline passed, and one sweeper per shard.

    The index is split in ``shards``; a namespace's sides are always in the same shard. Reports are
    at least once: a side is reported after :meth:`expire` and removed by :meth:`forget`, and a
    crash in between makes :meth:`expire` return the same copy again.
    """

    shards: int

    async def due(self, shard: int, now_ms: int, limit: int) -> list[DueSide]:
        """At most ``limit`` entries of ``shard`` whose deadline is at or before ``now_ms``, earliest first."""
        ...

    async def expire(self, side: DueSide) -> ExpireOutcome:
        """Take a due side out of the join, keeping a copy until :meth:`forget`.

        ``report``: publish the body, then forget the side (the same copy again until then).
        ``dropped``: a span a result joined; nothing to report. ``busy``: a result whose span is
        here, so its delivery is under way: :meth:`postpone` it. ``gone``: nothing is stored.
        """
        ...

    async def forget(self, side: DueSide) -> None:
        """Drop an expired side's copy and its index entry, unless the entry moved since :meth:`due` read it."""
        ...

    async def postpone(self, side: DueSide, deadline_ms: int) -> None:
        """Move the side's entry to ``deadline_ms`` if that is later; an entry no longer indexed stays gone."""
        ...

    async def try_lock(self, shard: int, token: str, ttl_ms: int) -> bool:
        """Take the shard's sweeper lock for ``token`` until ``ttl_ms`` passes; False if anyone holds it."""
        ...

    async def unlock(self, shard: int, token: str) -> None:
        """Release the shard's lock if ``token`` holds it; a lock another token holds stays."""
        ...

    async def index_size(self) -> tuple[int, int | None]:
        """(entries in the whole index, earliest deadline or None if empty): cheap, for the buffer gauges."""
        ...

    async def oldest(self, count: int) -> list[DueSide]:
        """The ``count`` entries of the whole index with the earliest deadlines, earliest first."""
        ...

    async def app_usage(self) -> dict[str, AppUsage]:
        """What each ml_app holds in the buffer (:class:`AppQuotas`), as counted with every write; apps holding
        nothing are left out. Cheap on a single Redis (one hash); on a Redis Cluster it reads one small hash per
        slot that holds sides."""
        ...

    async def oldest_pending(self, per_shard: int) -> dict[str, int]:
        """ml_app -> the earliest deadline of its sides still waiting for the other side (a span no result joined,
        a result in the pending hash), among the ``per_shard`` earliest entries of each shard."""
        ...


class Inspectable(Protocol):
    """What the operators' CLI reads; nothing here changes what is stored."""

    async def lookup(self, ns: Namespace) -> KeyState:
        """Everything stored for one join key, decoded (a record that cannot be decoded shows as text)."""
        ...

    async def census(self) -> dict[str, dict[str, int]]:
        """Buffered sides per ml_app: ``{"spans": n, "results": m}``; may read every key, so slow on a large buffer."""
        ...

    async def delivery_state(self, ns: Namespace, eval_id: str) -> str | None:
        """One evaluation's ledger entry as stored: ``d`` delivered, ``x`` dead-lettered, ``c|owner|lease_until_ms``."""
        ...
