"""The Datadog guide's batch join, verbatim but for the submit call, timed on files.

``python -m bench.guide OUTPUTS_JSON SCORES_JSONL`` runs the guide's loop: parse both files, and for
each output record parse its ``input.source`` and look its score up with the guide's linear
``find_score``. ``LLMObs.submit_evaluation`` is replaced by building the same arguments (no network),
so what is timed is the join itself. Prints one JSON line: outputs, joined, seconds.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

JOIN_KEY = "question_id"


def run(outputs_file: str, scores_file: str) -> dict[str, float]:
    started = time.perf_counter()

    def parse_json(file_path: str) -> Any:
        with open(file_path) as f:
            return json.load(f)

    def parse_jsonl(file_path: str) -> list[Any]:
        with open(file_path) as f:
            return [json.loads(line) for line in f]

    outputs = parse_json(outputs_file)
    scores = parse_jsonl(scores_file)

    def parse_source_into_dict(source: str) -> dict[str, str]:
        meta_dict = {}
        for meta in source.split(";"):
            key, value = meta.split("=")
            meta_dict[key] = value
        return meta_dict

    def find_score(join_key_value: str) -> Any:
        for score in scores:
            if str(score[JOIN_KEY]) == join_key_value:
                return score
        return None

    submitted: list[dict[str, Any]] = []
    for output in outputs:
        source = output["input"]["source"]
        meta = parse_source_into_dict(source)
        join_key_value = meta[JOIN_KEY]
        score_row = find_score(join_key_value)
        if score_row is None:
            continue  # the guide prints "ID ... not found in scores"
        submitted.append({
            "span": {"trace_id": meta["trace_id"], "span_id": meta["span_id"]},
            "metric_type": "score", "label": "quality_assessment", "value": score_row["score"],
            "metadata": {"model": score_row["model"], "judgement": score_row["judgment"]},
        })
    return {"outputs": len(outputs), "joined": len(submitted), "seconds": time.perf_counter() - started}


def main(argv: list[str]) -> int:
    sys.stdout.write(json.dumps(run(argv[0], argv[1])) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
