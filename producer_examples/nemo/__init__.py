"""NeMo Evaluator -> evaljoin: run evaluations with NVIDIA's client and publish their per-item results.

The package reads as the steps of a run:

| module | job |
| --- | --- |
| ``targets.py`` | target and config files, validated before they are sent; API keys kept secret |
| ``evaluator.py`` | the v1 evaluation API through ``nemo-microservices``: create or reuse, run, poll, fetch |
| ``readers.py`` | per-item files of every format (judge, rows, launcher, BYOB, lm-eval, BFCL, BEIR, RAGAS) |
| ``mapping.py`` | per-item results -> NeMo result events, by the rules stated there |
| ``publish.py`` | the two flows (a job; a local run) and publishing through ``EventPublisher`` |
| ``cli.py`` | ``python -m producer_examples.nemo run|from-files`` |
| ``errors.py`` | the error tree |
"""

from producer_examples.nemo.errors import (
    EvaluatorError,
    InputError,
    JobFailed,
    JobTimeout,
    MappingError,
    NemoPublisherError,
    PublishError,
    TargetError,
)
from producer_examples.nemo.evaluator import Aggregate, Evaluator
from producer_examples.nemo.mapping import MappingReport, MappingResult, RunContext, label_for, map_files
from producer_examples.nemo.publish import map_local_run, publish, run_job
from producer_examples.nemo.targets import load_config, load_target, parse_config, parse_target

__all__ = [
    "Aggregate",
    "Evaluator",
    "EvaluatorError",
    "InputError",
    "JobFailed",
    "JobTimeout",
    "MappingError",
    "MappingReport",
    "MappingResult",
    "NemoPublisherError",
    "PublishError",
    "RunContext",
    "TargetError",
    "label_for",
    "load_config",
    "load_target",
    "map_files",
    "map_local_run",
    "parse_config",
    "parse_target",
    "publish",
    "run_job",
]
