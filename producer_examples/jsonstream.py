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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import BinaryIO, Literal

Format = Literal["jsonl", "json_array"]
ArrayState = Literal["start", "after_element", "end"]

READ_SIZE = 64 * 1024  # bytes read from the file at a time
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
        return _ArrayScanner(self).records()

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

    def _mark(self, position: Position) -> None:
        self.position = position
        self._digest_at = position.offset
        self._digest = self._hasher.copy().hexdigest()


# -- JSON array ---------------------------------------------------------------------


class _Array(Enum):
    """Where a reader is in a JSON array. Each state has one handler in :class:`_ArrayScanner`."""

    START = "start"  # before the opening '['
    BEFORE_ELEMENT = "before_element"  # after '[' or ',': an element, or ']' (an empty array, a trailing comma)
    IN_ELEMENT = "in_element"  # inside an element: looking for its end
    AFTER_ELEMENT = "after_element"  # after an element: ',' or ']'
    END = "end"  # after the closing ']': only whitespace may follow


@dataclass
class _Element:
    """The element being read: where it starts, its kind, and its bytes so far (``None`` once it is too large)."""

    start: int
    line: int
    kind: Literal["container", "string", "scalar"]
    kept_from: int  # where in the window its bytes not yet in ``parts`` start
    depth: int = 0  # open brackets of a container
    in_string: bool = False
    escape: bool = False  # the previous byte in a string was a backslash
    parts: list[bytes] | None = field(default_factory=list)


class _ArrayScanner:
    """Splits a JSON array into its elements' exact bytes by scanning its structure, never parsing it.

    The file is read through a window ``buf`` that starts at the absolute offset ``base``; ``pos`` is
    the next byte of the window to look at. Bytes before ``hashed`` are in the reader's digest, and
    their newlines counted in ``line``. The reader's position is marked at each record boundary.
    """

    def __init__(self, reader: RecordReader) -> None:
        position = reader.position
        self._reader = reader
        self.state = _Array(position.array_state)
        self.index, self.line = position.index, position.line
        self.buf = b""
        self.base = self.hashed = position.offset
        self.pos = 0
        self.element: _Element | None = None  # set in IN_ELEMENT only

    def records(self) -> Iterator[RawRecord]:
        handlers: dict[_Array, Callable[[], RawRecord | None]] = {
            _Array.START: self._start,
            _Array.BEFORE_ELEMENT: self._before_element,
            _Array.IN_ELEMENT: self._in_element,
            _Array.AFTER_ELEMENT: self._after_element,
            _Array.END: self._end,
        }
        while True:
            if self.pos >= len(self.buf):
                if not self._refill():
                    break
                continue
            record = handlers[self.state]()
            if record is not None:
                yield record
        if self.state is not _Array.END:
            raise MalformedFile("the file ends inside the array (truncated?)", self.base)

    # -- one handler per state -----------------------------------------------------

    def _start(self) -> None:
        char = self._next_char()
        if char is None:
            return
        if char != ord("["):
            raise MalformedFile("a JSON array must start with '['", self.base + self.pos)
        self.pos += 1
        self.state = _Array.BEFORE_ELEMENT

    def _before_element(self) -> None:
        char = self._next_char()
        if char is None:
            return
        if char == ord("]"):  # an empty array, or a trailing comma
            self._close()
        elif char == ord(","):
            raise MalformedFile("an empty element in the array", self.base + self.pos)
        else:
            self._open(char)

    def _in_element(self) -> RawRecord | None:
        element = self.element
        assert element is not None
        if element.in_string:
            end = self._scan_string(element)
        elif element.kind == "scalar":
            end = self._scan_scalar()
        else:
            end = self._scan_container(element)
        self._drop_if_too_large(element, self.base + self.pos)
        return None if end is None else self._finish(element, end)

    def _after_element(self) -> None:
        char = self._next_char()
        if char is None:
            return
        if char == ord(","):
            self.pos += 1
            self.state = _Array.BEFORE_ELEMENT
        elif char == ord("]"):
            self._close()
        else:
            raise MalformedFile("expected ',' or ']' after an element of the array", self.base + self.pos)

    def _end(self) -> None:
        if self._next_char() is not None:
            raise MalformedFile("data after the end of the array", self.base + self.pos)

    # -- inside an element: each returns the element's end in the window once it is found --------

    def _scan_string(self, element: _Element) -> int | None:
        """Moves through a string (the element, or one inside it) to past its closing quote."""
        if element.escape:
            self.pos += 1
            element.escape = False
            return None
        at = self._find(_STRING_END)
        if at is None:
            return None
        self.pos = at + 1
        if self.buf[at] == ord("\\"):
            element.escape = True
            return None
        element.in_string = False
        return self.pos if element.kind == "string" else None

    def _scan_scalar(self) -> int | None:
        """A number, ``true``, ``false`` or ``null`` ends before ',', ']' or whitespace."""
        at = self._find(_SCALAR_END)
        if at is not None:
            self.pos = at
        return at

    def _scan_container(self, element: _Element) -> int | None:
        """An object or array ends at the bracket that closes its first one; strings inside are skipped."""
        at = self._find(_STRUCTURE)
        if at is None:
            return None
        char = self.buf[at]
        self.pos = at + 1
        if char == ord('"'):
            element.in_string = True
        elif char in b"[{":
            element.depth += 1
        else:
            element.depth -= 1
            if element.depth == 0:
                return self.pos
        return None

    # -- transitions and the window ------------------------------------------------------

    def _find(self, pattern: re.Pattern[bytes]) -> int | None:
        """Where ``pattern`` next matches in the window from ``pos``; if nowhere, ``None`` with ``pos`` at its end."""
        match = pattern.search(self.buf, self.pos)
        if match is None:
            self.pos = len(self.buf)
            return None
        return match.start()

    def _next_char(self) -> int | None:
        """The next byte that is not whitespace, with ``pos`` on it; ``None`` when the window holds no more."""
        at = self._find(_NOT_WHITESPACE)
        if at is None:
            return None
        self.pos = at
        return self.buf[at]

    def _open(self, char: int) -> None:
        """An element starts at ``pos`` with ``char``."""
        self._advance_to(self.base + self.pos)
        element = _Element(start=self.base + self.pos, line=self.line, kind="scalar", kept_from=self.pos)
        if char in b"[{":
            element.kind, element.depth = "container", 1
            self.pos += 1
        elif char == ord('"'):
            element.kind, element.in_string = "string", True
            self.pos += 1
        self.element = element
        self.state = _Array.IN_ELEMENT

    def _finish(self, element: _Element, end: int) -> RawRecord:
        """The element ends at ``end`` in the window: mark the position after it and make its record."""
        value = None if element.parts is None else b"".join([*element.parts, self.buf[element.kept_from:end]])
        absolute_end = self.base + end
        self._advance_to(absolute_end)
        self.element = None
        self.state = _Array.AFTER_ELEMENT
        self._reader._mark(Position(absolute_end, self.index + 1, self.line, "after_element"))
        record = RawRecord(index=self.index, line=element.line, start=element.start, end=absolute_end,
                           size=absolute_end - element.start, value=value)
        self.index += 1
        return record

    def _close(self) -> None:
        """Past the closing ']' at ``pos``: the array is complete."""
        self.pos += 1
        self.state = _Array.END
        self._advance_to(self.base + self.pos)
        self._reader._mark(Position(self.base + self.pos, self.index, self.line, "end"))

    def _drop_if_too_large(self, element: _Element, absolute: int) -> None:
        if element.parts is not None and absolute - element.start > self._reader._max:
            element.parts = None  # it is read on to its end, but not kept

    def _refill(self) -> bool:
        """Moves the window to the file's next bytes, keeping what the element in hand has of the old one.

        Returns ``False`` at the end of the file.
        """
        element = self.element
        if element is not None and element.parts is not None and element.kept_from < len(self.buf):
            element.parts.append(self.buf[element.kept_from:])
        self._advance_to(self.base + len(self.buf))
        self.base += len(self.buf)
        self.buf = self._reader._stream.read(self._reader._read_size)
        self.pos = 0
        self._reader.consumed = self.base + len(self.buf)
        if not self.buf:
            return False
        if self.base == 0 and self.buf.startswith(_BOM):
            self.pos = len(_BOM)
        if element is not None:
            element.kept_from = 0
            self._drop_if_too_large(element, self.base)
        return True

    def _advance_to(self, absolute: int) -> None:
        """Hash the window's bytes up to ``absolute`` and count their newlines."""
        if absolute > self.hashed:
            piece = self.buf[self.hashed - self.base:absolute - self.base]
            self._reader._hasher.update(piece)
            self.line += piece.count(b"\n")
            self.hashed = absolute
