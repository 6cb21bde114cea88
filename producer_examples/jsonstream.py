"""Reading JSON Lines files and JSON arrays one record at a time, in constant memory.

:class:`RecordReader` yields each record's bytes exactly as they are in the file (so they can be
published verbatim), with its position and the byte offset just past it (so a caller can resume
after the last record it finished). It never parses the records: a JSON array is split by
scanning its structure (strings, escapes, brackets), a JSON Lines file by its newlines. Memory is
bounded by ``max_record_bytes`` and the read size, not by the file: a larger record is yielded
without its bytes (``value is None``).

The reader also keeps a SHA-256 of every byte up to the last record it yielded
(:meth:`RecordReader.prefix_digest`); :func:`open_at` checks such a digest before resuming, so
a file that changed under a saved position is noticed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

Format = Literal["jsonl", "json_array"]
ArrayState = Literal["start", "after_element", "end"]

READ_SIZE = 64 * 1024
_BOM = b"\xef\xbb\xbf"
_WHITESPACE = b" \t\r\n"
_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_STRUCTURE = re.compile(rb'["\[\]{}]')
_STRING_END = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[,\] \t\r\n]")


class MalformedFile(ValueError):
    """The file is not a JSON array or JSON Lines file, at byte ``offset``; nothing after it can be read."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


@dataclass(frozen=True)
class RawRecord:
    """One record as it is in the file.

    ``index`` counts records from 0 (blank lines of a JSON Lines file are not records); ``line``
    is the 1-based line the record starts on; ``end`` is the byte offset just past the record,
    where reading resumes; ``value`` is the record's bytes without surrounding whitespace, or
    ``None`` when the record is longer than ``max_record_bytes`` (``size`` says how long).
    """

    index: int
    line: int
    start: int
    end: int
    size: int
    value: bytes | None


@dataclass(frozen=True)
class Position:
    """Where reading stopped: after record ``index - 1``, at byte ``offset``, on line ``line``."""

    offset: int = 0
    index: int = 0
    line: int = 1
    array_state: ArrayState = "start"


def detect_format(stream: BinaryIO) -> Format:
    """``json_array`` if the first byte that is not whitespace is ``[``, else ``jsonl``; rewinds the stream."""
    stream.seek(0)
    try:
        while chunk := stream.read(READ_SIZE):
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            match = _NOT_WHITESPACE.search(chunk)
            if match:
                return "json_array" if chunk[match.start()] == ord("[") else "jsonl"
        return "jsonl"
    finally:
        stream.seek(0)


def open_at(stream: BinaryIO, fmt: Format, position: Position, digest: str, *,
            max_record_bytes: int) -> RecordReader | None:
    """A reader continuing at ``position`` if the file's first ``position.offset`` bytes still hash to ``digest``.

    Returns ``None`` when they do not (the file changed, or is shorter): the caller starts over.
    Reads the prefix once, in constant memory.
    """
    stream.seek(0)
    hasher = hashlib.sha256()
    remaining = position.offset
    while remaining > 0:
        chunk = stream.read(min(READ_SIZE, remaining))
        if not chunk:
            return None
        hasher.update(chunk)
        remaining -= len(chunk)
    if hasher.hexdigest() != digest:
        return None
    return RecordReader(stream, fmt, max_record_bytes=max_record_bytes, position=position, hasher=hasher)


class RecordReader:
    """Iterates over the records of a JSON Lines file or a JSON array, from ``position`` on.

    The stream must be positioned at ``position.offset``; ``hasher`` must have hashed exactly the
    bytes before it (both hold for a fresh stream and the defaults). :attr:`position` is updated
    after each record and, at the end of the file, to the end.
    """

    def __init__(self, stream: BinaryIO, fmt: Format, *, max_record_bytes: int,
                 position: Position | None = None, hasher: hashlib._Hash | None = None,
                 read_size: int = READ_SIZE) -> None:
        self._stream = stream
        self.format: Format = fmt
        self._max = max_record_bytes
        self._read_size = read_size
        self.position = position or Position()
        self._hasher = hasher or hashlib.sha256()
        self._digest_at = self.position.offset
        self._digest = self._hasher.copy().hexdigest()
        self.consumed = self.position.offset
        """Bytes read so far (for progress; may run ahead of :attr:`position`)."""

    def prefix_digest(self) -> str:
        """SHA-256 (hex) of the file's bytes before :attr:`position`."""
        if self._digest_at != self.position.offset:
            raise RuntimeError("the digest is only known at record boundaries")
        return self._digest

    def __iter__(self) -> Iterator[RawRecord]:
        if self.format == "jsonl":
            return self._lines()
        return self._array()

    # -- JSON Lines -------------------------------------------------------------

    def _lines(self) -> Iterator[RawRecord]:
        offset, index, line_no = self.position.offset, self.position.index, self.position.line
        while True:
            start = offset
            line = self._stream.readline(self._max + 2)
            if not line:
                break
            size = len(line)
            self._hasher.update(line)
            kept: bytes | None = line
            if not line.endswith(b"\n") and size >= self._max + 2:
                kept = None  # a longer line than any record we keep: skip to its end without keeping it
                while True:
                    rest = self._stream.readline(self._read_size)
                    if not rest:
                        break
                    size += len(rest)
                    self._hasher.update(rest)
                    if rest.endswith(b"\n"):
                        break
            offset += size
            self.consumed = offset
            if start == 0 and kept is not None and kept.startswith(_BOM):
                kept = kept[len(_BOM):]
            value = kept.strip(_WHITESPACE) if kept is not None else None
            record_line = line_no
            line_no += 1
            if value is not None and not value:
                self._mark(Position(offset, index, line_no))
                continue  # a blank line is not a record
            if value is not None and len(value) > self._max:
                value = None
            self._mark(Position(offset, index + 1, line_no))
            yield RawRecord(index=index, line=record_line, start=start, end=offset, size=size, value=value)
            index += 1

    # -- JSON array -------------------------------------------------------------

    def _array(self) -> Iterator[RawRecord]:
        position = self.position
        state: str = {"start": "start", "after_element": "after", "end": "end"}[position.array_state]
        index, line_no = position.index, position.line
        buf = b""
        base = position.offset  # absolute offset of buf[0]
        pos = 0
        hashed = position.offset  # absolute offset hashed (and lines counted) so far
        # the element being read
        elem_start = elem_line = 0
        kind = ""  # "container", "string" or "scalar"
        depth = 0
        in_string = escape = False
        parts: list[bytes] | None = []
        seg = 0

        def advance_to(absolute: int) -> None:
            """Hash and count lines of the bytes of ``buf`` up to ``absolute``."""
            nonlocal hashed, line_no
            if absolute > hashed:
                piece = buf[hashed - base:absolute - base]
                self._hasher.update(piece)
                line_no += piece.count(b"\n")
                hashed = absolute

        def element_size(end_in_buf: int) -> int:
            return base + end_in_buf - elem_start

        while True:
            if pos >= len(buf):
                if state == "in" and parts is not None and seg < len(buf):
                    parts.append(buf[seg:])
                advance_to(base + len(buf))
                base += len(buf)
                buf = self._stream.read(self._read_size)
                pos = seg = 0
                self.consumed = base + len(buf)
                if not buf:
                    break
                if base == 0 and buf.startswith(_BOM):
                    pos = len(_BOM)
                if state == "in" and parts is not None and element_size(0) > self._max:
                    parts = None
                continue
            if state != "in":
                match = _NOT_WHITESPACE.search(buf, pos)
                if match is None:
                    pos = len(buf)
                    continue
                pos = match.start()
                char = buf[pos]
                if state == "start":
                    if char != ord("["):
                        raise MalformedFile("a JSON array must start with '['", base + pos)
                    pos += 1
                    state = "before_first"
                elif state in ("before_first", "before"):
                    if char == ord("]"):  # an empty array, or a trailing comma
                        pos += 1
                        state = "end"
                        advance_to(base + pos)
                        self._mark(Position(base + pos, index, line_no, "end"))
                    elif char == ord(","):
                        raise MalformedFile("an empty element in the array", base + pos)
                    else:
                        advance_to(base + pos)
                        elem_start, elem_line, seg, parts = base + pos, line_no, pos, []
                        depth, in_string, escape = 0, False, False
                        if char in b"[{":
                            kind, depth = "container", 1
                            pos += 1
                        elif char == ord('"'):
                            kind, in_string = "string", True
                            pos += 1
                        else:
                            kind = "scalar"
                        state = "in"
                elif state == "after":
                    if char == ord(","):
                        pos += 1
                        state = "before"
                    elif char == ord("]"):
                        pos += 1
                        state = "end"
                        advance_to(base + pos)
                        self._mark(Position(base + pos, index, line_no, "end"))
                    else:
                        raise MalformedFile("expected ',' or ']' after an element of the array", base + pos)
                else:  # end
                    raise MalformedFile("data after the end of the array", base + pos)
                continue
            # inside an element: find where it ends
            end: int | None = None
            if in_string:
                if escape:
                    pos += 1
                    escape = False
                    continue
                match = _STRING_END.search(buf, pos)
                if match is None:
                    pos = len(buf)
                elif buf[match.start()] == ord("\\"):
                    escape = True
                    pos = match.start() + 1
                else:
                    in_string = False
                    pos = match.start() + 1
                    if kind == "string":
                        end = pos
            elif kind == "scalar":
                match = _SCALAR_END.search(buf, pos)
                if match is None:
                    pos = len(buf)
                else:
                    pos = end = match.start()
            else:
                match = _STRUCTURE.search(buf, pos)
                if match is None:
                    pos = len(buf)
                else:
                    char = buf[match.start()]
                    pos = match.start() + 1
                    if char == ord('"'):
                        in_string = True
                    elif char in b"[{":
                        depth += 1
                    else:
                        depth -= 1
                        if depth == 0:
                            end = pos
            if parts is not None and element_size(pos) > self._max:
                parts = None
            if end is None:
                continue
            value = None if parts is None else b"".join([*parts, buf[seg:end]])
            absolute_end = base + end
            advance_to(absolute_end)
            state = "after"
            self._mark(Position(absolute_end, index + 1, line_no, "after_element"))
            yield RawRecord(index=index, line=elem_line, start=elem_start, end=absolute_end,
                            size=absolute_end - elem_start, value=value)
            index += 1
        if state != "end":
            raise MalformedFile("the file ends inside the array (truncated?)", base)

    def _mark(self, position: Position) -> None:
        self.position = position
        self._digest_at = position.offset
        self._digest = self._hasher.copy().hexdigest()
