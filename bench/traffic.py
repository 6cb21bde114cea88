"""Realistic traffic: N pairs (span-context event + NeMo result event) across M apps.

Each pair is one answered question: a span-context event on the span topic and a NeMo result
event with ``evals`` evaluations on the result topic, both keyed by the join key. The schedule says
when each side is produced: ``order`` decides which side of a pair comes first (``spans-first``,
``results-first`` or ``interleaved``, a seeded coin per pair), ``lag_ms`` how much later the second
side follows, ``rate`` how many pairs start per second. A ``duplicates`` fraction of sides is
produced twice (the same bytes, as a producer retry would), and an ``unmatched`` fraction of pairs
only ever produces one side. The same pairs can be written as the guide's ``outputs.json`` and
``scores.jsonl``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

Order = Literal["spans-first", "results-first", "interleaved"]
ORDERS: tuple[Order, ...] = ("spans-first", "results-first", "interleaved")

EMITTED_BEFORE_MS = 3_600_000  # by default pair 0's span context was emitted this long before the traffic is made
EVALUATED_AFTER_MS = 60_000  # its evaluations are this much later
PASS_RATE = 0.8  # evaluations assessed "pass"
REASONING_WORDS = 14  # words of an evaluation's reasoning
DUPLICATE_AFTER_S = 0.001  # a duplicated side is produced again this much later
_WORDS = ("the", "answer", "names", "ingredients", "and", "steps", "in", "order", "cites", "recipe", "it",
          "used", "without", "inventing", "quantities", "that", "source", "does", "not", "give")


@dataclass(frozen=True)
class TrafficSpec:
    pairs: int = 10_000
    apps: int = 10
    evals: int = 2
    order: Order = "interleaved"
    lag_ms: float = 100.0
    duplicates: float = 0.02
    unmatched: float = 0.05
    seed: int = 7
    run: str = "r0"  # makes join keys and event ids unique per run, so runs never see each other's data
    # Pair i's span context was emitted at this time plus i ms; 0: an hour before now. Evaluations must be recent,
    # as in production: one older than the intake's 24 h window takes the service's clamping path (a copy per
    # result), which a fixed date in the past made every benchmark evaluation take.
    emitted_at_ms: int = 0


@dataclass(frozen=True)
class Pair:
    index: int
    ml_app: str
    join_key: str
    trace_id: str
    span_id: str
    span: bytes
    result: bytes
    span_first: bool
    sides: tuple[bool, bool]  # (span produced, result produced)
    duplicated: tuple[bool, bool]

    @property
    def matched(self) -> bool:
        return all(self.sides)

    @property
    def key(self) -> bytes:
        return f"{self.ml_app}:{self.join_key}".encode()


@dataclass(frozen=True)
class Send:
    """One record to produce ``at_s`` seconds after the start; ``second`` marks a pair's completing side."""

    at_s: float
    topic_kind: Literal["span", "result"]
    pair: int
    second: bool


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def make_pairs(spec: TrafficSpec) -> list[Pair]:
    rng = random.Random(spec.seed)
    emitted_at_ms = spec.emitted_at_ms or int(time.time() * 1000) - EMITTED_BEFORE_MS
    pairs = []
    for index in range(spec.pairs):
        ml_app = f"bench-app-{index % spec.apps}"
        join_key = f"{spec.run}-q{index}"
        trace_id = f"{rng.getrandbits(128):032x}"
        span_id = str(rng.getrandbits(63) or 1)
        emitted = emitted_at_ms + index
        span = orjson.dumps({
            "schema_version": 1, "ml_app": ml_app, "join_key": join_key, "trace_id": trace_id,
            "span_id": span_id, "tags": {"env": "prod", "version": "1.4.2"}, "emitted_at_ms": emitted})
        evaluations = []
        for e in range(spec.evals):
            evaluations.append({
                "label": ("faithfulness", "answer_relevancy", "quality_assessment", "toxicity")[e % 4] + (
                    f"_{e // 4}" if e >= 4 else ""),
                "metric_type": "score", "value": round(rng.random(), 4),
                "assessment": "pass" if rng.random() < PASS_RATE else "fail",
                "reasoning": _sentence(rng, REASONING_WORDS),
                "tags": {"evaluator": "nemo"}, "timestamp_ms": emitted + EVALUATED_AFTER_MS})
        result = orjson.dumps({
            "schema_version": 1, "event_id": f"job-{spec.run}:{join_key}", "ml_app": ml_app, "join_key": join_key,
            "evaluations": evaluations,
            "provenance": {"job_id": f"job-{spec.run}", "config": "bench/faithfulness", "target_type": "model",
                           "target_name": "bench/support-bot", "model": "meta/llama-3.1-8b-instruct",
                           "judge": "meta/llama-3.1-70b-instruct", "evaluated_at_ms": emitted + EVALUATED_AFTER_MS}})
        span_first = {"spans-first": True, "results-first": False}.get(spec.order, rng.random() < 0.5)
        sides = (True, True)
        if rng.random() < spec.unmatched:
            sides = (True, False) if rng.random() < 0.5 else (False, True)
        duplicated = (rng.random() < spec.duplicates, rng.random() < spec.duplicates)
        pairs.append(Pair(index, ml_app, join_key, trace_id, span_id, span, result, span_first, sides, duplicated))
    return pairs


def schedule(pairs: list[Pair], *, rate: float, lag_ms: float) -> list[Send]:
    """Every record to produce, in time order: pair i starts at i / rate, its second side lag_ms later."""
    sends = []
    for pair in pairs:
        start = pair.index / rate
        first, second = ("span", "result") if pair.span_first else ("result", "span")
        for kind, at, is_second in ((first, start, False), (second, start + lag_ms / 1000, True)):
            side = 0 if kind == "span" else 1
            if not pair.sides[side]:
                continue
            sends.append(Send(at, kind, pair.index, is_second and pair.matched))  # type: ignore[arg-type]
            if pair.duplicated[side]:
                sends.append(Send(at + DUPLICATE_AFTER_S, kind, pair.index, False))  # type: ignore[arg-type]
    sends.sort(key=lambda s: s.at_s)
    return sends


def write_guide_files(pairs: list[Pair], directory: Path) -> tuple[Path, Path]:
    """The same pairs as the guide's ``outputs.json`` and ``scores.jsonl`` (one judge score per question)."""
    outputs, scores = [], []
    for pair in pairs:
        span = orjson.loads(pair.span)
        result = orjson.loads(pair.result)
        if pair.sides[0]:
            outputs.append({"input": {"prompt": "What are the ingredients in cake?", "ideal_response": "flour",
                                      "category": "food", "source": f"trace_id={pair.trace_id};"
                                      f"span_id={pair.span_id};question_id={span['join_key']}"},
                            "response": result["evaluations"][0]["reasoning"], "llm_name": "gpt-3.5-turbo"})
        if pair.sides[1]:
            scores.append({"question_id": span["join_key"], "model": "meta/llama-3.1-8b-instruct",
                           "judge": ["meta/llama-3.1-70b-instruct", "single-v1"], "user_prompt": "[Instruction] ...",
                           "judgment": result["evaluations"][0]["reasoning"],
                           "score": result["evaluations"][0]["value"], "turn": 1, "tstamp": 1740429821.1})
    directory.mkdir(parents=True, exist_ok=True)
    out_path, scores_path = directory / "outputs.json", directory / "scores.jsonl"
    out_path.write_bytes(orjson.dumps(outputs))
    scores_path.write_bytes(b"".join(orjson.dumps(s) + b"\n" for s in scores))
    return out_path, scores_path
