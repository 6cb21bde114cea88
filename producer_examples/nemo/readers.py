"""Per-item result files: found in a run's output directory, a file, or a downloaded zip, and parsed.

Four kinds of per-item output are read (``Format``):

``judge``
    NeMo's LLM-as-a-judge / MT-bench judgment lines, one JSON object a line:
    ``{question_id, model, judge, user_prompt, judgment, score, turn, tstamp}``.
``launcher``
    The NeMo Evaluator launcher's per-sample ``results.jsonl``:
    ``{problem_idx, repeat, reward, scorer_rewards, model_response, expected_answer, metadata, ...}``.
``byob``
    A BYOB benchmark's ``byob_predictions.jsonl``: ``{sample_id, response, target, scores, status,
    error, metadata}``.
``beir``
    Retriever and RAG per-query scores: JSON lines with the query's ``_id`` and its scores
    (``{"_id": "q1", "scores": {"ndcg_cut_10": 0.8}}``, or the scores as top-level numbers), or, given
    by its path, one JSON object ``{query_id: {measure: value}}`` as ``pytrec_eval`` gives it.

JSON is read with the standard library, which accepts the ``NaN`` and ``Infinity`` that Python
evaluators write, so that the mapping can report them instead of failing on them. A zip is read in
memory and never extracted.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from producer_examples.nemo.errors import MappingError

Format = Literal["judge", "launcher", "byob", "beir"]
FORMATS: tuple[Format, ...] = get_args(Format)

DEFAULT_ID_COLUMN: dict[Format, str] = {
    "judge": "question_id",
    "launcher": "metadata.question_id",
    "byob": "metadata.question_id",
    "beir": "_id",
}

MAX_FILE_BYTES = 1 << 30  # a per-item file is read whole: larger ones are refused
MAX_ZIP_BYTES = 4 << 30  # what a results zip may unpack to


@dataclass(frozen=True)
class Record:
    """One per-item record. ``where`` names it for messages: ``path:line`` or ``path:query_id``."""

    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class ResultFile:
    """The records of one per-item file, with the file's path inside the run (``/``-separated)."""

    path: str
    format: Format
    records: list[Record]


def sniff(fields: dict[str, Any]) -> Format | None:
    """The format a record looks like, from its keys."""
    if "sample_id" in fields and "scores" in fields:
        return "byob"
    if "problem_idx" in fields and ("reward" in fields or "scorer_rewards" in fields):
        return "launcher"
    if "judgment" in fields and "score" in fields:
        return "judge"
    if "_id" in fields and _has_scores(fields):
        return "beir"
    return None


def _has_scores(fields: dict[str, Any]) -> bool:
    """A per-query score line, not a BEIR query or corpus line (``_id``, ``text``, ``title``, ``metadata``)."""
    if any(isinstance(fields.get(key), dict) for key in ("scores", "metrics")):
        return True
    return any(isinstance(value, int | float) for key, value in fields.items() if key != "_id")


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MappingError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None


def _jsonl_records(path: str, data: bytes) -> list[Record]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MappingError(f"{path}: not UTF-8 text") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        value = _loads(line, where)
        if not isinstance(value, dict):
            raise MappingError(f"{where}: each line must be a JSON object")
        records.append(Record(where, value))
    return records


def _query_map_records(path: str, data: bytes) -> list[Record] | None:
    """``{query_id: {measure: value}}`` as records with ``_id`` and ``scores``; None if not that shape."""
    try:
        value = _loads(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise MappingError(f"{path}: not UTF-8 text") from None
    if not isinstance(value, dict) or not all(isinstance(scores, dict) for scores in value.values()):
        return None
    return [Record(f"{path}:{query}", {"_id": query, "scores": scores}) for query, scores in value.items()]


def parse_file(path: str, data: bytes, fmt: Format | None, *, explicit: bool = False) -> ResultFile | None:
    """Parse one file of a run. None when it is not a per-item file (of format ``fmt``, if given).

    ``explicit``: the caller named this very file, so with ``fmt`` given it is read as that format
    even if its first record does not look like it (missing fields are then reported per record).
    """
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(path, data)
        if not records:
            return ResultFile(path, fmt, []) if explicit and fmt else None
        found = sniff(records[0].fields)
        if fmt is not None and (found == fmt or explicit):
            return ResultFile(path, fmt, records)
        if fmt is None and found is not None:
            return ResultFile(path, found, records)
        return None
    if suffix == ".json" and fmt == "beir" and explicit:
        # Only a file named explicitly: a run's directory holds other JSON objects (aggregates, configs).
        query_records = _query_map_records(path, data)
        if query_records is None:
            raise MappingError(f"{path}: a beir .json file must be an object {{query_id: {{measure: value}}}}")
        return ResultFile(path, "beir", query_records)
    if explicit:
        raise MappingError(f"{path}: per-item files are .jsonl (or, for beir, .json)")
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise MappingError(f"{path.name}: larger than {MAX_FILE_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise MappingError(f"{path.name}: cannot be read ({exc.strerror})") from None


def read_zip(data: bytes, fmt: Format | None) -> list[ResultFile]:
    """The per-item files in a zip (as ``download-results`` gives it), without extracting it."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise MappingError("the results archive is not a zip file") from None
    with archive:
        entries = [info for info in archive.infolist() if not info.is_dir()]
        if sum(info.file_size for info in entries) > MAX_ZIP_BYTES:
            raise MappingError(f"the results archive unpacks to more than {MAX_ZIP_BYTES} bytes")
        found = []
        for info in sorted(entries, key=lambda entry: entry.filename):
            if info.file_size > MAX_FILE_BYTES:
                raise MappingError(f"{info.filename}: larger than {MAX_FILE_BYTES} bytes")
            parsed = parse_file(info.filename, archive.read(info), fmt)
            if parsed is not None:
                found.append(parsed)
    return found


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() == ".jsonl":
            yield path


def read_path(path: Path, fmt: Format) -> list[ResultFile]:
    """The per-item files of format ``fmt`` in a run's output directory, a single file, or a zip."""
    if path.is_dir():
        found = []
        for file in _walk(path):
            parsed = parse_file(file.relative_to(path).as_posix(), _read_bytes(file), fmt)
            if parsed is not None:
                found.append(parsed)
    elif path.suffix.lower() == ".zip":
        found = read_zip(_read_bytes(path), fmt)
    elif path.exists():
        parsed = parse_file(path.name, _read_bytes(path), fmt, explicit=True)
        found = [parsed] if parsed is not None else []
    else:
        raise MappingError(f"{path.name}: no such file or directory")
    if not found:
        raise MappingError(f"{path.name}: no {fmt} per-item result files found")
    return found
