"""Per-item result files: found in a run's output directory, a file, or a downloaded zip, and parsed.

Every evaluation type NeMo Evaluator runs writes its per-item output in one of these formats
(``Format``); each is recognised by its records, never by a file name alone, and each has a fixture
under ``tests/fixtures/nemo/`` with the source of its shape:

``judge``
    LLM-as-a-judge / MT-bench judgment lines (``scores.jsonl``):
    ``{question_id, model, judge, user_prompt, judgment, score, turn, tstamp}``.
``rows``
    NeMo Evaluator's row scores of a metric job (LLM-as-a-judge and custom metrics):
    ``{row_index, item: {dataset columns}, sample: {...}, metrics: {metric: [{name, value}]},
    requests, metric_errors}``.
``launcher``
    The NeMo Evaluator launcher's per-sample ``results.jsonl``, of every benchmark it runs natively,
    agentic ones included (they add ``trajectory``):
    ``{problem_idx, repeat, reward, scorer_rewards, model_response, expected_answer, metadata, ...}``.
``byob``
    A BYOB benchmark's ``byob_predictions.jsonl``: ``{sample_id, response, target, scores, status,
    error, metadata}``.
``lm_eval``
    lm-evaluation-harness samples (``samples_<task>_<time>.jsonl``, written with ``--log_samples``):
    ``{doc_id, doc, target, arguments, resps, filtered_resps, filter, metrics: [names], <name>: value}``.
``bfcl``
    Berkeley Function Calling Leaderboard score files (``score/<model>/BFCL_v3_*_score.json``, and in
    BFCL v4 ``score/<model>/<group>/BFCL_v4_*_score.json``; JSON lines despite the name): a first
    line ``{accuracy, correct_count, total_count}``, then one line per *failed* entry ``{id, valid:
    false, error, error_type, ...}`` (multi-turn and agentic entries nest ``error: {error_message,
    error_type, details}``); the entries that passed are those of the matching
    ``result/<model>/[<group>/]BFCL_*_result.json`` that the score file does not list.
``beir``
    Retriever and RAG per-query scores: JSON lines with the query's ``_id`` and its scores
    (``{"_id": "q1", "scores": {"ndcg_cut_10": 0.8}}``, or IR measures as top-level numbers), or,
    given by its path, one JSON object ``{query_id: {measure: value}}`` as ``pytrec_eval`` gives it.
``ragas``
    RAGAS per-item results (RAG metrics, and the agentic metrics over multi-turn samples): the
    sample's fields (``user_input``, ``retrieved_contexts``, ``response``, ``reference``, ...; older
    RAGAS: ``question``, ``contexts``, ``answer``, ``ground_truth``) and one number per metric.

Not result files, and never taken for one: a BEIR corpus, queries or qrels file, a dataset, a
config (their records lack every format's score fields). Files that hold **aggregate scores only**
(bigcode-evaluation-harness' ``evaluation_results.json``, lm-evaluation-harness' ``results_*.json``
without samples, a BFCL score file without its result file) are named in :attr:`Scan.notes`, which
the publisher's summary prints: they are not attached to spans, and not silently skipped.

JSON is read with the standard library, which accepts the ``NaN`` and ``Infinity`` that Python
evaluators write, so that the mapping can report them instead of failing on them. A zip is read in
memory and never extracted.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from producer_examples.nemo.errors import MappingError

Format = Literal["judge", "rows", "launcher", "byob", "lm_eval", "bfcl", "beir", "ragas"]
FORMATS: tuple[Format, ...] = get_args(Format)

DEFAULT_ID_COLUMN: dict[Format, str] = {
    "judge": "question_id",
    "rows": "item.question_id",
    "launcher": "metadata.question_id",
    "byob": "metadata.question_id",
    "lm_eval": "doc.question_id",
    "bfcl": "id",
    "beir": "_id",
    "ragas": "question_id",
}

MAX_FILE_BYTES = 1 << 30  # a per-item file is read whole: larger ones are refused
MAX_ZIP_BYTES = 4 << 30  # what a results zip may unpack to

# Files that are inputs of an evaluation, never its results, whatever their records look like.
NOT_RESULTS = frozenset({"corpus", "queries", "qrels"})
# IR measures as pytrec_eval and BEIR name them: a line with one of these as a top-level number is a per-query score.
_IR_MEASURE = re.compile(r"^(ndcg|map|recall|p|precision|mrr|recip_rank|success|r_cap|hole|bpref|accuracy)(_|@|$)",
                         re.IGNORECASE)
# RAGAS metrics (RAG and agentic) by name or prefix, as RAGAS names its result columns.
_RAGAS_METRIC = re.compile(
    r"^(faithfulness|answer_|context_|llm_context_|non_llm_context_|nv_|noise_sensitivity|factual_correctness|"
    r"semantic_similarity|topic_adherence|tool_call_|agent_goal_|summary_score|instance_rubrics|rubrics_score|"
    r"domain_specific_rubrics|simple_criteria|aspect_critic|harmfulness|maliciousness|coherence|correctness|"
    r"conciseness|bleu_score|rouge_score|exact_match|string_present|response_relevancy|response_groundedness)",
    re.IGNORECASE)
# The sample's own fields in a RAGAS result row, single-turn and multi-turn, current and older schema.
# (RAGAS' SingleTurnSample and MultiTurnSample in src/ragas/dataset_schema.py; a field a row lacks is null in a
# table of mixed rows, so it must not be taken for a metric.)
RAGAS_SAMPLE_FIELDS = frozenset({
    "user_input", "retrieved_contexts", "reference_contexts", "retrieved_context_ids", "reference_context_ids",
    "response", "multi_responses", "reference", "rubrics", "reference_topics", "reference_tool_calls",
    "reference_goal", "persona_name", "query_style", "query_length", "question", "contexts", "answer",
    "ground_truth", "ground_truths",
})
_LM_EVAL_SAMPLES = re.compile(r"^samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d\-.:]+\.jsonl$")
_LM_EVAL_RESULTS = re.compile(r"^results_\d{4}-\d{2}-\d{2}T[\d\-.:]+\.json$")


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
    task: str | None = None  # the task the file itself names (lm-evaluation-harness samples)


@dataclass
class Scan:
    """What a run's output holds: its per-item files, and notes on what it holds without per-item output."""

    files: list[ResultFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def lm_eval_task(path: str) -> str | None:
    """The task an lm-evaluation-harness samples file names: ``samples_<task>_<time>.jsonl``."""
    match = _LM_EVAL_SAMPLES.match(PurePosixPath(path).name)
    return match["task"] if match else None


def _ir_scores(fields: dict[str, Any]) -> bool:
    numbers = [key for key, value in fields.items()
               if key != "_id" and isinstance(value, int | float) and not isinstance(value, bool)]
    return bool(numbers) and any(_IR_MEASURE.match(key) for key in numbers)


def _ragas_row(fields: dict[str, Any]) -> bool:
    sample = "user_input" in fields or ("question" in fields and ("answer" in fields or "contexts" in fields))
    return sample and any(
        _RAGAS_METRIC.match(key) and (value is None or isinstance(value, int | float))
        for key, value in fields.items() if key not in RAGAS_SAMPLE_FIELDS)


def sniff(fields: dict[str, Any]) -> Format | None:
    """The format a record looks like, from its keys (None: not a per-item result record)."""
    if isinstance(fields.get("item"), dict) and isinstance(fields.get("metrics"), dict) and "sample" in fields:
        return "rows"
    if "sample_id" in fields and "scores" in fields:
        return "byob"
    if "problem_idx" in fields and ("reward" in fields or "scorer_rewards" in fields):
        return "launcher"
    if "judgment" in fields and "score" in fields:
        return "judge"
    if "doc_id" in fields and "doc" in fields and isinstance(fields.get("metrics"), list):
        return "lm_eval"
    if "_id" in fields and (any(isinstance(fields.get(key), dict) for key in ("scores", "metrics"))
                            or _ir_scores(fields)):
        return "beir"
    if _ragas_row(fields):
        return "ragas"
    return None


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MappingError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None


def _text(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MappingError(f"{path}: not UTF-8 text") from None


def _jsonl_records(path: str, data: bytes) -> list[Record]:
    records = []
    for number, line in enumerate(_text(path, data).splitlines(), start=1):
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
    value = _loads(_text(path, data), path)
    if not isinstance(value, dict) or not all(isinstance(scores, dict) for scores in value.values()):
        return None
    return [Record(f"{path}:{query}", {"_id": query, "scores": scores}) for query, scores in value.items()]


def _not_results(path: str) -> bool:
    return PurePosixPath(path).stem.lower() in NOT_RESULTS


def parse_file(path: str, data: bytes, fmt: Format | None, *, explicit: bool = False) -> ResultFile | None:
    """Parse one ``.jsonl`` (or, named explicitly, beir ``.json``) file. None when it is not a per-item file.

    ``explicit``: the caller named this very file, so with ``fmt`` given it is read as that format
    even if its first record does not look like it (missing fields are then reported per record).
    BFCL score files are JSON lines named ``.json``: :func:`scan_entries` reads them with their result files.
    """
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".jsonl":
        if _not_results(path):
            if explicit:
                stem = PurePosixPath(path).stem
                raise MappingError(f"{path}: a {stem} file is an evaluation's input, not its results")
            return None
        records = _jsonl_records(path, data)
        if not records:
            return ResultFile(path, fmt, [], lm_eval_task(path)) if explicit and fmt else None
        found = sniff(records[0].fields)
        if fmt is not None and (found == fmt or explicit):
            return ResultFile(path, fmt, records, lm_eval_task(path) if fmt == "lm_eval" else None)
        if fmt is None and found is not None:
            return ResultFile(path, found, records, lm_eval_task(path) if found == "lm_eval" else None)
        return None
    if suffix == ".json" and fmt == "beir" and explicit:
        # Only a file named explicitly: a run's directory holds other JSON objects (aggregates, configs).
        query_records = _query_map_records(path, data)
        if query_records is None:
            raise MappingError(f"{path}: a beir .json file must be an object {{query_id: {{measure: value}}}}")
        return ResultFile(path, "beir", query_records)
    if explicit:
        raise MappingError(f"{path}: per-item files are .jsonl (or, for beir, .json; for bfcl, *_score.json)")
    return None


# --- BFCL: score files with their result files ----------------------------------------------------


def _bfcl_header(records: list[Record]) -> bool:
    return bool(records) and {"accuracy", "total_count"} <= records[0].fields.keys()


def _bfcl_result_path(score_path: str) -> str:
    parts = list(PurePosixPath(score_path).parts)
    if "score" in parts:
        parts[len(parts) - 1 - parts[::-1].index("score")] = "result"
    name = parts[-1][: -len("_score.json")] + "_result.json"
    return str(PurePosixPath(*parts[:-1], name))


def _bfcl_file(path: str, data: bytes, results: dict[str, bytes], notes: list[str]) -> ResultFile | None:
    """A BFCL score file as per-entry records: its failed entries, and the passed ones of its result file."""
    try:
        records = _jsonl_records(path, data)
    except MappingError:
        return None  # a JSON object, not JSON lines: not a BFCL score file
    if not _bfcl_header(records):
        return None
    failed = [Record(r.where, {**r.fields, "valid": bool(r.fields.get("valid", False))}) for r in records[1:]]
    failed_ids = {r.fields.get("id") for r in failed}
    result_path = _bfcl_result_path(path)
    if result_path not in results:
        notes.append(f"{path}: BFCL result file {result_path} not found: only the {len(failed)} failed entries "
                     "are published; the passed ones are known only from it")
        return ResultFile(path, "bfcl", failed)
    passed = [Record(r.where, {"id": r.fields.get("id"), "valid": True})
              for r in _jsonl_records(result_path, results[result_path]) if r.fields.get("id") not in failed_ids]
    return ResultFile(path, "bfcl", passed + failed)


# --- aggregate-only output ------------------------------------------------------------------------


def _aggregate_note(path: str, has_lm_eval_samples: bool) -> str | None:
    """A note when ``path`` holds aggregate scores only (of a harness that has no per-item output)."""
    name = PurePosixPath(path).name
    if name == "evaluation_results.json":
        return (f"{path}: bigcode-evaluation-harness aggregate scores (pass@k): it writes no per-item scores, "
                "nothing to attach to spans")
    if _LM_EVAL_RESULTS.match(name) and not has_lm_eval_samples:
        return (f"{path}: lm-evaluation-harness aggregate scores without samples: run it with --log_samples "
                "for per-item output")
    return None


def scan_entries(entries: list[tuple[str, bytes]], fmt: Format | None) -> Scan:
    """The per-item files (of format ``fmt``, if given) among a run's files, and notes on aggregate-only ones."""
    scan = Scan()
    results = {path: data for path, data in entries if path.endswith("_result.json")}
    lm_eval_dirs = {str(PurePosixPath(path).parent) for path, _ in entries if lm_eval_task(path)}
    for path, data in sorted(entries):
        parsed: ResultFile | None = None
        if path.endswith("_score.json"):
            if fmt in (None, "bfcl"):
                parsed = _bfcl_file(path, data, results, scan.notes)
        elif PurePosixPath(path).suffix.lower() == ".json":
            note = _aggregate_note(path, str(PurePosixPath(path).parent) in lm_eval_dirs)
            if note:
                scan.notes.append(note)
        else:
            parsed = parse_file(path, data, fmt)
        if parsed is not None:
            scan.files.append(parsed)
    return scan


def _wanted(path: str) -> bool:
    suffix = PurePosixPath(path).suffix.lower()
    name = PurePosixPath(path).name
    return suffix == ".jsonl" or name.endswith(("_score.json", "_result.json")) or (
        suffix == ".json" and (name == "evaluation_results.json" or bool(_LM_EVAL_RESULTS.match(name))))


def scan_zip(data: bytes, fmt: Format | None) -> Scan:
    """The per-item files in a zip (as ``download-results`` gives it), without extracting it."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise MappingError("the results archive is not a zip file") from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        if sum(info.file_size for info in infos) > MAX_ZIP_BYTES:
            raise MappingError(f"the results archive unpacks to more than {MAX_ZIP_BYTES} bytes")
        entries = []
        for info in infos:
            if not _wanted(info.filename):
                continue
            if info.file_size > MAX_FILE_BYTES:
                raise MappingError(f"{info.filename}: larger than {MAX_FILE_BYTES} bytes")
            entries.append((info.filename, archive.read(info)))
    return scan_entries(entries, fmt)


def read_zip(data: bytes, fmt: Format | None) -> list[ResultFile]:
    """The per-item files in a zip (see :func:`scan_zip`)."""
    return scan_zip(data, fmt).files


def _read_bytes(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise MappingError(f"{path.name}: larger than {MAX_FILE_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise MappingError(f"{path.name}: cannot be read ({exc.strerror})") from None


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and _wanted(path.name):
            yield path


def scan_path(path: Path, fmt: Format | None) -> Scan:
    """The per-item files (of format ``fmt``, if given) of a run's output directory, a single file, or a zip.

    Raises :class:`MappingError` when it holds neither per-item files nor aggregate-only output.
    """
    if path.is_dir():
        scan = scan_entries([(file.relative_to(path).as_posix(), _read_bytes(file)) for file in _walk(path)], fmt)
    elif path.suffix.lower() == ".zip":
        scan = scan_zip(_read_bytes(path), fmt)
    elif path.name.endswith("_score.json") and fmt in (None, "bfcl"):
        siblings = [(file.as_posix(), _read_bytes(file)) for file in (path, Path(_bfcl_result_path(path.as_posix())))
                    if file.exists()]
        scan = scan_entries(siblings, fmt)
    elif path.exists():
        parsed = parse_file(path.name, _read_bytes(path), fmt, explicit=fmt is not None)
        scan = Scan([parsed] if parsed is not None else [])
    else:
        raise MappingError(f"{path.name}: no such file or directory")
    if not scan.files and not scan.notes:
        kind = f"{fmt} " if fmt else ""
        raise MappingError(f"{path.name}: no {kind}per-item result files found")
    return scan


def read_path(path: Path, fmt: Format | None) -> list[ResultFile]:
    """The per-item files of a run (see :func:`scan_path`)."""
    return scan_path(path, fmt).files
