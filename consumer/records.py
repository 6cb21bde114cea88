"""How a buffered side is stored in Redis: compact JSON, deflated against a fixed dictionary.

A span waits in Redis for the whole join TTL (a day by default), joined or not, so its stored size
sets the Redis bill: at 1,000 spans/s and a day's TTL, 86 million records. The stored record
therefore leaves out what the key already says (``ml_app``, the join key and the run), null fields and empty
objects, and is deflated with a preset dictionary of the field names and values every record
repeats, which is what makes deflate pay off on records of a few hundred bytes.

Format: one version byte, then the body. ``0x01``: raw deflate (no zlib header) of the compact JSON
with :data:`_ZDICT_V1`. A record that starts with ``{`` is plain JSON, as written before this
format existed, and still reads, so a rolling upgrade keeps what is buffered. The dictionary of a
version never changes; a better one is a new version byte, and old records keep reading.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import orjson

from consumer.store import LEDGER_NAMES, KeyState, Namespace, Readable

_V1: Final = b"\x01"
_WBITS: Final = -15  # raw deflate: no header or checksum, 6 bytes saved per record
# zlib's memory level: its hash table and output buffer, set up for every record. The default (8) sizes
# them for long inputs; a record and the dictionary are under 2 KiB, and 4 deflates them as small, 12%
# faster in the service (memLevel is the compressor's alone: what it writes inflates as before).
_MEM_LEVEL: Final = 4

# Substrings that recur in stored records, least common first (deflate reaches nearer ones with
# shorter distances). Built from the event models' field names and the service's own fields.
_ZDICT_V1: Final = b"".join([
    b'"metadata":{"nemo":{"job_id":"","config":"","target_type":"model","target_name":"","model":"',
    b'"judge":"","evaluated_at_ms":17',
    b'"metric_type":"categorical","value":"',
    b'"metric_type":"boolean","value":true',
    b'"metric_type":"json","value":{',
    b'"provenance":{"job_id":"","config":"","target_type":"model","target_name":"","model":"meta/llama-3.1-',
    b'"judge":"meta/llama-3.1-","evaluated_at_ms":17',
    b'"tags":{"env":"prod","version":"',
    b'"emitted_at_ms":17',
    b'"assessment":"fail","reasoning":"The answer ',
    b'"tags":{"evaluator":"nemo"},"timestamp_ms":17',
    b'{"label":"faithfulness","metric_type":"score","value":0.',
    b'"assessment":"pass","reasoning":"the answer ',
    b'{"event_id":"","evaluations":[{"label":"',
    b'"received_ts_ms":17',
    b'"source":{"topic":"nemo.eval-results","partition":',
    b',"offset":',
    b',"timestamp_ms":17',
    b'{"trace_id":"","span_id":"',
    b'"source":{"topic":"llmobs.span-context","partition":',
])

_IMPLIED: Final = ("ml_app", "join_key", "run_id")
_IN_SPAN_IDENTITY: Final = ("trace_id", "span_id")


def encode(fields: dict[str, Any], *, leave_out: tuple[str, ...] = ()) -> bytes:
    """The stored form of a side's record (its ``ml_app``, join key and run are restored by :func:`decode`)."""
    skip = _IMPLIED + leave_out
    compact = {key: value for key, value in fields.items() if key not in skip and value is not None and value != {}}
    deflate = zlib.compressobj(6, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, _ZDICT_V1)
    return _V1 + deflate.compress(orjson.dumps(compact)) + deflate.flush()


def decode(data: bytes, ns: Namespace) -> dict[str, Any]:
    """A stored record as the dict it was made from, with ``ml_app``, ``join_key`` and ``run_id`` from ``ns``."""
    if data[:1] == _V1:
        inflate = zlib.decompressobj(_WBITS, _ZDICT_V1)
        fields: dict[str, Any] = orjson.loads(inflate.decompress(data[1:]) + inflate.flush())
    else:  # plain JSON, written before the compact format
        fields = orjson.loads(data)
    fields["ml_app"] = ns.ml_app
    fields["join_key"] = ns.join_key
    if ns.run:
        fields["run_id"] = ns.run
    return fields


def span_identity(trace_id: str, span_id: str) -> str:
    """What names a span in the store; its body leaves these out (see :func:`encode_span`)."""
    return f"{trace_id}:{span_id}"


def encode_span(fields: dict[str, Any]) -> bytes:
    """A span's body: the store keeps it after the span's identity, so the ids are not repeated."""
    return encode(fields, leave_out=_IN_SPAN_IDENTITY)


def decode_span(stored: bytes, ns: Namespace) -> dict[str, Any]:
    """A span as the store returns it (identity, ``\\n``, body) as the dict it was made from."""
    identity, _, body = stored.partition(b"\n")
    fields = decode(body, ns)
    trace_id, _, span_id = identity.decode().partition(":")
    fields["trace_id"] = trace_id
    fields["span_id"] = span_id
    return fields


def key_state(ns: Namespace, *, span: bytes | None, span_joined: bool, pending: Mapping[str, bytes],
              ledger: Mapping[str, str], being_reported: Iterable[str], replaced_span: bytes | None = None,
              waiting: Iterable[str] = ()) -> KeyState:
    """The view of what a store holds for one join key, decoded for people to read.

    ``span`` is identity, "\\n", body; ``ledger`` states are as :meth:`Inspectable.delivery_state` returns them.
    """

    def readable(data: bytes, decode: Callable[[bytes, Namespace], dict[str, Any]]) -> Readable:
        try:
            return decode(data, ns)
        except (ValueError, zlib.error):  # not a record this version wrote: show it as it is
            return data.decode("utf-8", "replace")

    return KeyState(
        span=None if span is None else readable(span, decode_span),
        span_joined=span_joined,
        pending_results={event_id: readable(record, decode) for event_id, record in pending.items()},
        ledger={eval_id: LEDGER_NAMES.get(state, "in flight" if state.startswith("c|") else state)
                for eval_id, state in ledger.items()},
        being_reported=sorted(being_reported),
        replaced_span=None if replaced_span is None else readable(replaced_span, decode_span),
        waiting=sorted(waiting),
    )
