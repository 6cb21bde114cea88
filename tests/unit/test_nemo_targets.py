"""Target and config validation has the shape of the ``nemo-microservices`` client's request types.

The oracle is the client itself: pydantic validating its ``TargetCreateParams`` and
``ConfigCreateParams`` (a body "the client accepts" validates, and comes back with no key dropped:
the client's ``TypedDict`` silently drops a key it does not know), and the keyword parameters of its
``targets.create`` and ``configs.create``. Every body the client accepts, our validation accepts and
sends unchanged; a body with an unknown field or a wrong type is refused with its path.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from nemo_microservices.resources.evaluation.configs import AsyncConfigsResource
from nemo_microservices.resources.evaluation.targets import AsyncTargetsResource
from nemo_microservices.types.dataset_ev_param import DatasetEvParam
from nemo_microservices.types.evaluation.config_create_params import ConfigCreateParams
from nemo_microservices.types.evaluation.target_create_params import TargetCreateParams
from nemo_microservices.types.model_ev_param import ModelEvParam
from nemo_microservices.types.shared_params.api_endpoint_data import APIEndpointData
from nemo_microservices.types.shared_params.prompt_data import PromptData
from nemo_microservices.types.task_config_param import TaskConfigParam
from pydantic import TypeAdapter

from producer_examples.nemo.cli import main
from producer_examples.nemo.errors import TargetError
from producer_examples.nemo.targets import (
    TARGET_TYPES,
    collect_secrets,
    judge_model,
    load_config,
    load_target,
    parse_config,
    parse_target,
    request_body,
)

pytestmark = pytest.mark.unit

CLIENT_TARGET = TypeAdapter(TargetCreateParams)
CLIENT_CONFIG = TypeAdapter(ConfigCreateParams)
KEY = "nvapi-unit-0123456789abcdef"
NIM = "http://nim.internal:8000/v1"
LLM = {"api_endpoint": {"url": f"{NIM}/chat/completions", "model_id": "meta/llama-3.1-8b-instruct"}}
EMBED = {"api_endpoint": {"url": f"{NIM}/embeddings", "model_id": "nvidia/nv-embedqa-e5-v5"}}
RERANK = {"api_endpoint": {"url": f"{NIM}/ranking", "model_id": "nvidia/nv-rerankqa-mistral-4b-v3"}}
DATASET = {"files_url": "s3://eval-data/fiqa/", "format": "beir", "split": "test", "limit": 50}
PIPELINE = {"query_embedding_model": EMBED, "index_embedding_model": EMBED, "reranker_model": RERANK, "top_k": 5}
OWNERSHIP = {"created_by": "user-1", "access_policies": {"team": "search"}}
PROMPT = {"system_prompt": "Answer briefly.", "inference_params": {"temperature": 0.2, "max_tokens": 256}}


def target(kind: str, **body: Any) -> dict[str, Any]:
    return {"type": kind, "name": f"t-{kind}", "namespace": "my-org", **body}


# Bodies the client's types accept, for every target type, with the fields the issue found refused:
# a dataset on retriever and RAG targets, dataset format/split/limit, a model's prompt, ownership,
# s3:// URLs.
CLIENT_BODIES = {
    "model_endpoint": target("model", model=LLM),
    "model_prompt_and_key": target("model", model={
        "api_endpoint": {"url": "https://api.example.com/v1/chat/completions", "model_id": "gpt-4o-mini",
                         "api_key": KEY, "format": "openai"}, "prompt": PROMPT}),
    "model_entity_name": target("model", model="meta/llama-3.1-8b-instruct"),
    "model_entity_object": target("model", model={"name": "llama-3.1-8b-instruct", "namespace": "meta"}),
    "model_ownership": target("model", model=LLM, ownership=OWNERSHIP, description="nightly", project="urn:p:1",
                              custom_fields={"owner": "search-team"}),
    "cached_outputs_s3": target("cached_outputs", cached_outputs={"files_url": "s3://eval-data/answers.jsonl"}),
    "retriever_pipeline_dataset": target("retriever", retriever={"pipeline": PIPELINE, "dataset": DATASET}),
    "retriever_entity_models": target("retriever", retriever={
        "pipeline": {"query_embedding_model": "nvidia/nv-embedqa-e5-v5",
                     "index_embedding_model": "nvidia/nv-embedqa-e5-v5"}}),
    "retriever_cached_dataset": target("retriever", retriever={
        "cached_outputs": {"files_url": "nds://my-org/retrieved"}, "dataset": {**DATASET, "split": "validation"}}),
    "rag_pipeline_dataset": target("rag", rag={
        "pipeline": {"retriever": {"pipeline": PIPELINE}, "model": {**LLM, "prompt": PROMPT},
                     "context_ordering": "desc"},
        "dataset": {"files_url": "hf://datasets/my-org/ragas-qa", "format": "ragas", "limit": 20}}),
    "rag_cached_retrieval": target("rag", rag={"pipeline": {
        "retriever": {"cached_outputs": {"files_url": "s3://eval-data/retrieved.jsonl"}, "dataset": DATASET},
        "model": "meta/llama-3.1-8b-instruct"}}),
    "rag_cached": target("rag", rag={"cached_outputs": {"files_url": "file:///data/rag-cache"}}),
    "rows": target("rows", rows=[{"question": "What is in a cake?", "answer": "flour"}]),
    "dataset_object": target("dataset", dataset={**DATASET, "files_url": "s3://eval-data/qa.jsonl",
                                                 "ownership": OWNERSHIP}),
    "dataset_name": target("dataset", dataset="my-org/qa-set"),
}

CLIENT_CONFIGS = {
    "custom_judge": {"type": "custom", "name": "judge-cfg", "namespace": "my-org", "tasks": {"qa": {
        "type": "chat-completion", "dataset": {"files_url": "s3://eval-data/qa.jsonl", "limit": 10},
        "params": {"template": {"messages": [{"role": "user", "content": "{{item.question}}"}]}},
        "metrics": {"judge": {"type": "llm-judge", "params": {"model": {"api_endpoint": {
            "url": "http://judge/v1/chat/completions", "model_id": "judge", "api_key": KEY}}}}}}}},
    "retriever_groups": {"type": "retriever", "name": "beir-cfg", "ownership": OWNERSHIP, "tasks": {"fiqa": {
        "type": "beir", "dataset": {"files_url": "file://fiqa/"},
        "metrics": {"recall_5": {"type": "recall_5"}}}},
        "groups": {"all": {"tasks": ["fiqa"], "metrics": {"mean": {"type": "mean"}}}},
        "params": {"parallelism": 4, "temperature": 1, "top_p": 0.9, "stop": ["\n"], "extra": {"seed": 1}}},
    "named_dataset": {"type": "lm_eval_harness", "name": "mmlu", "description": "d", "custom_fields": {"k": 1},
                      "tasks": {"mmlu": {"type": "mmlu", "dataset": "my-org/mmlu"}}, "params": {"stop": "###"}},
}


def client_accepts(adapter: TypeAdapter[Any], body: dict[str, Any]) -> bool:
    """The client's types validate ``body`` and keep every key of it."""
    kept: Any = adapter.dump_python(adapter.validate_python(copy.deepcopy(body)), mode="json")
    return bool(kept == body)


def refusal(body: dict[str, Any], parse: Any = parse_target) -> str:
    with pytest.raises(TargetError) as caught:
        parse(body)
    return str(caught.value)


def fields(td: type) -> str:
    return ", ".join(sorted(get_type_hints(td)))


@pytest.mark.parametrize("name", sorted(CLIENT_BODIES))
def test_a_target_the_client_accepts_is_accepted_and_sent_unchanged(name: str) -> None:
    """Each target body the client's types accept validates here, and its request body is what was given."""
    body = CLIENT_BODIES[name]
    assert client_accepts(CLIENT_TARGET, body)
    assert set(body) <= set(inspect.signature(AsyncTargetsResource.create).parameters)  # the client's keywords
    spec = parse_target(body)
    assert spec.type == body["type"] and spec.ref == f"my-org/t-{body['type']}"
    assert request_body(spec) == body


def test_every_target_type_of_the_client_is_covered() -> None:
    """The bodies above cover every target type the client knows; a new type in the client fails this."""
    assert {body["type"] for body in CLIENT_BODIES.values()} == set(TARGET_TYPES)


@pytest.mark.parametrize("name", sorted(CLIENT_CONFIGS))
def test_a_config_the_client_accepts_is_accepted_and_sent_unchanged(name: str) -> None:
    """Each config body the client's types accept validates here and is sent unchanged, its keys kept secret."""
    body = CLIENT_CONFIGS[name]
    assert client_accepts(CLIENT_CONFIG, body)
    assert set(body) <= set(inspect.signature(AsyncConfigsResource.create).parameters)
    spec = parse_config(body)
    assert request_body(spec) == {"namespace": "default", **body}
    assert KEY not in repr(spec) and KEY not in str(spec)


# (body, where the unknown field is, the client type whose fields are allowed there)
UNKNOWN = [
    (target("model", model=LLM, labels={"a": "b"}), "labels", TargetCreateParams),
    (target("model", model={"api_endpoint": {**LLM["api_endpoint"], "apikey": KEY}}), "model.api_endpoint.apikey",
     APIEndpointData),
    (target("model", model={**LLM, "prompt": {**PROMPT, "user_prompt": "x"}}), "model.prompt.user_prompt",
     PromptData),
    (target("model", model={**LLM, "temperature": 0.1}), "model.temperature", ModelEvParam),
    (target("retriever", retriever={"pipeline": PIPELINE, "dataset": {**DATASET, "subset": "fiqa"}}),
     "retriever.dataset.subset", DatasetEvParam),
    (target("rag", rag={"pipeline": {"retriever": {"pipeline": {**PIPELINE, "query_embedding_model": {
        **EMBED, "dims": 1024}}}, "model": LLM}}), "rag.pipeline.retriever.pipeline.query_embedding_model.dims",
     ModelEvParam),
]


@pytest.mark.parametrize(("body", "path", "allowed"), UNKNOWN, ids=[u[1] for u in UNKNOWN])
def test_an_unknown_target_field_is_refused_with_its_path_and_what_is_allowed(body: dict[str, Any], path: str,
                                                                              allowed: type) -> None:
    """A field the client does not know (which its TypedDict would drop) is refused: path and allowed fields named."""
    assert not client_accepts(CLIENT_TARGET, body)  # the client would silently drop it
    message = refusal(body)
    assert f"{path}: unknown field; allowed here: {fields(allowed)}" in message
    assert KEY not in message


def test_an_unknown_config_field_is_refused_with_its_path_and_what_is_allowed() -> None:
    """Configs too: a top-level judge in params (not a field there) and a typo in a task name the allowed fields."""
    judge = {"type": "custom", "name": "c", "params": {"judge": {"model": LLM}, "temperature": 0.1}}
    assert not client_accepts(CLIENT_CONFIG, judge)
    message = refusal(judge, parse_config)
    assert "params.judge: unknown field; allowed here: extra, limit_samples, max_retries" in message
    typo = {"type": "custom", "name": "c", "tasks": {"qa": {"type": "chat-completion", "metric": {}}}}
    assert f"tasks.qa.metric: unknown field; allowed here: {fields(TaskConfigParam)}" in refusal(typo, parse_config)


WRONG_TYPES = [
    (target("retriever", retriever={"pipeline": PIPELINE, "dataset": {**DATASET, "limit": "50"}}),
     "retriever.dataset.limit: Input should be a valid integer"),
    (target("retriever", retriever={"pipeline": PIPELINE, "dataset": {**DATASET, "split": ["test"]}}),
     "retriever.dataset.split: Input should be a valid string"),
    (target("rag", rag={"cached_outputs": {"files_url": "s3://b/k"}, "dataset": {**DATASET, "format": 1}}),
     "rag.dataset.format: Input should be a valid string"),
    (target("model", model={**LLM, "prompt": {"inference_params": {"temperature": "hot"}}}),
     "model.prompt.inference_params.temperature: Input should be a valid"),
    (target("model", model=LLM, ownership={"access_policies": {"team": 1}}),
     "ownership.access_policies.team: Input should be a valid string"),
    (target("model", model={"api_endpoint": {**LLM["api_endpoint"], "format": "anthropic"}}),
     "model.api_endpoint.format: Input should be 'nim', 'openai' or 'lama_stack'"),
    (target("model", model=["a"]), "model: Input should be a string or an object"),
    (target("dataset", dataset={"format": "beir"}), "dataset.files_url: Field required"),
    (target("model", model=LLM, custom_fields=[1]), "custom_fields: Input should be a valid dictionary"),
]


@pytest.mark.parametrize(("body", "message"), WRONG_TYPES, ids=[w[1].split(":")[0] for w in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_refused_naming_its_path(body: dict[str, Any], message: str) -> None:
    """A value of the wrong JSON type is refused, not coerced, with its path and the expected type."""
    assert message in refusal(body)


RULES = [
    (target("model", model={"namespace": "meta"}), "model: a model object needs its api_endpoint, or the name"),
    (target("model", model=LLM, retriever={"pipeline": PIPELINE}), "retriever: not taken by a target of type model"),
    (target("rows", rows=[]), "rows: give at least one row"),
    (target("retriever", retriever={"dataset": DATASET}), "retriever: give exactly one of pipeline and cached_outputs"),
    (target("cached_outputs", cached_outputs={"files_url": "gs://bucket/answers"}),
     "cached_outputs.files_url: files_url must be a hf/nds/s3/file/http/https URL"),
    (target("retriever", retriever={"pipeline": PIPELINE, "dataset": {"files_url": "s3://<my-bucket>/x"}}),
     "retriever.dataset.files_url: files_url 's3://<my-bucket>/x' still contains a <placeholder>"),
    (target("rag", rag={"pipeline": {"retriever": {"pipeline": PIPELINE}, "model": EMBED}}),
     "rag.pipeline.model.api_endpoint.url: an LLM's url must end with /completions or /chat/completions"),
    (target("model", model="<my-model>"), "model: '<my-model>' still contains a <placeholder>"),
    (target("dataset", dataset="my org/qa"), "dataset: the name of a stored entity (namespace/name) is not empty"),
]


@pytest.mark.parametrize(("body", "message"), RULES, ids=[r[1].split(":")[0] for r in RULES])
def test_our_rules_beyond_the_types_are_refused_with_their_path(body: dict[str, Any], message: str) -> None:
    """The documented rules the types do not carry are refused at their path (the types alone would pass them)."""
    assert client_accepts(CLIENT_TARGET, body)
    assert message in refusal(body)


def test_an_embedding_endpoint_is_not_held_to_the_llm_rule() -> None:
    """Only an LLM's URL must be a completions URL: a retriever's embedding and reranking URLs are not."""
    spec = parse_target(CLIENT_BODIES["retriever_pipeline_dataset"])
    assert request_body(spec)["retriever"]["pipeline"]["reranker_model"] == RERANK


def test_keys_anywhere_are_kept_secret() -> None:
    """The key of a model with a prompt is SecretStr: collected for the redactor, never in repr or errors."""
    spec = parse_target(CLIENT_BODIES["model_prompt_and_key"])
    assert KEY not in repr(spec) and collect_secrets(spec) == [KEY]
    bad = copy.deepcopy(CLIENT_BODIES["model_prompt_and_key"])
    bad["model"]["prompt"]["temperature"] = 1
    assert KEY not in refusal(bad)


def test_target_and_config_files_with_an_unknown_field_name_file_path_and_allowed(tmp_path: Path) -> None:
    """The file's name, the field's path and the fields allowed there are in the error."""
    (tmp_path / "target.json").write_text(json.dumps(UNKNOWN[1][0]))
    with pytest.raises(TargetError, match=r"target file target\.json is not valid:\n  model\.api_endpoint\.apikey: "
                                          r"unknown field; allowed here: api_key, format, model_id, url"):
        load_target(tmp_path / "target.json")
    (tmp_path / "config.json").write_text(json.dumps({"type": "custom", "name": "c", "task": {}}))
    with pytest.raises(TargetError, match=r"config file config\.json is not valid:\n  task: unknown field; "
                                          r"allowed here: custom_fields, description, groups, name"):
        load_config(tmp_path / "config.json")


def test_the_command_exits_2_on_an_unknown_field_before_any_request(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``run`` with such a file prints the error, no traceback and no key, and exits 2 before reaching the evaluator."""
    (tmp_path / "target.json").write_text(json.dumps(UNKNOWN[1][0]))
    (tmp_path / "config.json").write_text(json.dumps(CLIENT_CONFIGS["custom_judge"]))
    code = main(["run", "--evaluator-url", "http://127.0.0.1:9", "--target-file", str(tmp_path / "target.json"),
                 "--config-file", str(tmp_path / "config.json"), "--ml-app", "app", "--bootstrap-servers",
                 "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: target file target.json is not valid:\n  model.api_endpoint.apikey: unknown field" in err
    assert "Traceback" not in err and KEY not in err


def test_judge_model_is_found_in_an_llm_judge_metric_and_in_a_task_judge() -> None:
    metric_config = {"type": "custom", "tasks": {"qa": {"type": "chat-completion", "metrics": {
        "helpfulness": {"type": "llm-judge", "params": {"model": {"api_endpoint": {
            "url": "http://judge.example/v1/chat/completions", "model_id": "meta/llama-3.1-70b-instruct"}}}}}}}}
    task_config = {"type": "custom", "tasks": {"mt": {"type": "mt-bench", "params": {"judge": {"model": {
        "api_endpoint": {"url": "http://judge.example/v1", "model_id": "gpt-4"}}}}}}}
    assert judge_model(metric_config) == "meta/llama-3.1-70b-instruct"
    assert judge_model(task_config) == "gpt-4"
    assert judge_model({"type": "custom", "tasks": {"qa": {"metrics": {"em": {"type": "string-check"}}}}}) is None
