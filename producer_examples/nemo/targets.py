"""Evaluation targets and configs, validated before anything is sent to NeMo Evaluator.

Every target type of NVIDIA's "Create and Manage Evaluation Targets" guide is a model here:

* ``model``: an LLM behind a completions or chat-completions URL, optionally OpenAI-compatible
  behind an ``api_key`` (``format: openai``), or a reference to a model entity;
* ``cached_outputs``: pre-generated answers at a ``files_url``;
* ``retriever``: query and index embedding models, optionally a reranker, and a positive ``top_k``;
* ``rag``: cached answers; cached retrieval + a model; a retriever pipeline + a model; the same with
  a reranker;
* ``rows`` and ``dataset``, which the API also takes.

The guide's last two RAG examples nest ``api_endpoint`` inside ``api_endpoint``; the API does not
take that, and neither does :func:`parse_target`: its error names the fix.

API keys are :class:`pydantic.SecretStr`: ``repr`` and ``str`` of a target show ``**********``,
validation errors are formatted without input values, and :func:`request_body` is the only place a
key is revealed, to put it in the request. :func:`collect_secrets` gives the keys of a target or
config to the log redactor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from producer_examples.nemo.errors import TargetError

NESTED_ENDPOINT_FIX = "move url/model_id up one level: model.api_endpoint.url"
REDACTED = "[redacted]"

_SECRET_KEY = re.compile(r"(api[_-]?key|password|passwd|secret|token|authorization)", re.IGNORECASE)
_MIN_SECRET_CHARS = 4
_SHOWN_CHARS = 80  # of a bad value quoted in a message
_SHOWN_ERRORS = 10  # validation errors listed; the rest are counted

# NeMo entity names are path segments (``namespace/name``): no slash, no spaces or control characters.
EntityName = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")]
ModelRef = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[^\s<>]+$")]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def _check_url(value: str, *, schemes: tuple[str, ...], what: str) -> str:
    if "<" in value or ">" in value:
        raise ValueError(f"{what} {value[:_SHOWN_CHARS]!r} still contains a <placeholder> from the guide")
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path.strip("/")):
        raise ValueError(f"{what} must be a {'/'.join(schemes)} URL")
    return value


class ApiEndpoint(_Spec):
    """Where a model answers: ``{url, model_id, api_key?, format?}``."""

    url: str
    model_id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    api_key: SecretStr | None = None
    format: Literal["nim", "openai", "lama_stack"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_nested(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_endpoint" in data:
            raise ValueError(
                "api_endpoint is nested inside api_endpoint (as in the last two RAG examples of NVIDIA's "
                f"target guide), which the API does not accept: {NESTED_ENDPOINT_FIX}"
            )
        return data

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _check_url(value, schemes=("http", "https"), what="url")

    @field_validator("api_key")
    @classmethod
    def _not_masked(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and (not value.get_secret_value() or set(value.get_secret_value()) == {"*"}):
            raise ValueError("api_key is empty or the API's masked echo (******); give the real key")
        return value


class LlmEndpoint(ApiEndpoint):
    """An LLM's endpoint: the URL is the completions or chat-completions URL itself."""

    @field_validator("url")
    @classmethod
    def _completions_url(cls, value: str) -> str:
        if not urlsplit(value).path.rstrip("/").endswith("/completions"):
            raise ValueError("an LLM's url must end with /completions or /chat/completions")
        return value


class LlmModel(_Spec):
    """An LLM given by its endpoint."""

    api_endpoint: LlmEndpoint


class EmbeddingModel(_Spec):
    """An embedding or reranking model given by its endpoint."""

    api_endpoint: ApiEndpoint


class CachedOutputs(_Spec):
    """Pre-generated data: answers, retrieved documents, or both."""

    files_url: str

    @field_validator("files_url")
    @classmethod
    def _files_url(cls, value: str) -> str:
        return _check_url(value, schemes=("hf", "nds", "file", "http", "https"), what="files_url")


def _object_or_name(value: Any) -> str:
    return _NAME_TAG if isinstance(value, str) else _OBJECT_TAG


# A model is an object or the name of a model entity: validated as the one the input is, so that
# errors speak of that one only. The tags are left out of error locations.
_OBJECT_TAG, _NAME_TAG = "(object)", "(name)"
EmbeddingModelOrRef = Annotated[
    Annotated[EmbeddingModel, Tag(_OBJECT_TAG)] | Annotated[ModelRef, Tag(_NAME_TAG)], Discriminator(_object_or_name)]
LlmModelOrRef = Annotated[
    Annotated[LlmModel, Tag(_OBJECT_TAG)] | Annotated[ModelRef, Tag(_NAME_TAG)], Discriminator(_object_or_name)]
CachedOutputsOrRef = Annotated[
    Annotated[CachedOutputs, Tag(_OBJECT_TAG)] | Annotated[ModelRef, Tag(_NAME_TAG)], Discriminator(_object_or_name)]


class RetrieverPipeline(_Spec):
    """Dense retrieval with an embedding model, optionally reranked."""

    query_embedding_model: EmbeddingModelOrRef
    index_embedding_model: EmbeddingModelOrRef
    reranker_model: EmbeddingModelOrRef | None = None
    top_k: Annotated[int, Field(strict=True, ge=1)] | None = None


class _OneOf(_Spec):
    """Exactly one of ``pipeline`` and ``cached_outputs``."""

    @model_validator(mode="after")
    def _exactly_one(self) -> _OneOf:
        given = [name for name in ("pipeline", "cached_outputs") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of pipeline and cached_outputs")
        return self


class RetrieverSpec(_OneOf):
    """A retriever: a pipeline, or cached retrieval results."""

    pipeline: RetrieverPipeline | None = None
    cached_outputs: CachedOutputs | None = None


class RagPipeline(_Spec):
    """Retrieval (a pipeline or cached) followed by answer generation with an LLM."""

    retriever: RetrieverSpec
    model: LlmModelOrRef
    context_ordering: str | None = None


class RagSpec(_OneOf):
    """A RAG pipeline, or cached retrieval and answers."""

    pipeline: RagPipeline | None = None
    cached_outputs: CachedOutputs | None = None


class _TargetBase(_Spec):
    name: EntityName
    namespace: EntityName = "default"
    description: str | None = None
    custom_fields: dict[str, Any] | None = None
    project: str | None = None

    @property
    def ref(self) -> str:
        """``namespace/name``: how jobs and the API address the target."""
        return f"{self.namespace}/{self.name}"


class ModelTarget(_TargetBase):
    type: Literal["model"]
    model: LlmModelOrRef


class CachedOutputsTarget(_TargetBase):
    type: Literal["cached_outputs"]
    cached_outputs: CachedOutputs


class RetrieverTarget(_TargetBase):
    type: Literal["retriever"]
    retriever: RetrieverSpec


class RagTarget(_TargetBase):
    type: Literal["rag"]
    rag: RagSpec


class RowsTarget(_TargetBase):
    type: Literal["rows"]
    rows: Annotated[list[dict[str, Any]], Field(min_length=1)]


class DatasetTarget(_TargetBase):
    type: Literal["dataset"]
    dataset: CachedOutputsOrRef


Target = ModelTarget | CachedOutputsTarget | RetrieverTarget | RagTarget | RowsTarget | DatasetTarget

TARGET_TYPES: dict[str, type[_TargetBase]] = {
    "model": ModelTarget,
    "cached_outputs": CachedOutputsTarget,
    "retriever": RetrieverTarget,
    "rag": RagTarget,
    "rows": RowsTarget,
    "dataset": DatasetTarget,
}


class EvaluationConfigSpec(BaseModel):
    """An evaluation config: checked for what a job needs, the rest passed through as given."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    name: EntityName
    namespace: EntityName = "default"
    tasks: dict[str, dict[str, Any]] | None = None
    groups: dict[str, dict[str, Any]] | None = None
    params: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __repr__(self) -> str:  # the config may hold a judge's api_key: never print it
        return f"EvaluationConfigSpec(ref={self.ref!r}, type={self.type!r}, tasks={sorted(self.tasks or {})!r})"

    __str__ = __repr__


def _format_errors(exc: ValidationError, what: str) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False)[:_SHOWN_ERRORS]:
        location = ".".join(str(p) for p in error["loc"] if p not in (_OBJECT_TAG, _NAME_TAG)) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}")
    more = exc.error_count() - len(lines)
    if more > 0:
        lines.append(f"and {more} more")
    return f"{what} is not valid:\n  " + "\n  ".join(lines)


def parse_target(data: Any, *, what: str = "target") -> Target:
    """Validate a target as the API takes it. Raises :class:`TargetError` (never with a key in it)."""
    if not isinstance(data, dict):
        raise TargetError(f"{what} must be a JSON object")
    kind = data.get("type")
    model = TARGET_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise TargetError(f"{what} is not valid:\n  type: must be one of {', '.join(TARGET_TYPES)}")
    try:
        target = model.model_validate(data)
    except ValidationError as exc:
        # ``from None``: the pydantic error carries the input values, api keys included.
        raise TargetError(_format_errors(exc, what)) from None
    return cast(Target, target)


def parse_config(data: Any, *, what: str = "config") -> EvaluationConfigSpec:
    """Validate an evaluation config. Raises :class:`TargetError`."""
    if not isinstance(data, dict):
        raise TargetError(f"{what} must be a JSON object")
    try:
        return EvaluationConfigSpec.model_validate(data)
    except ValidationError as exc:
        raise TargetError(_format_errors(exc, what)) from None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TargetError(f"{what} {path.name}: cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # The message of JSONDecodeError quotes no input, only the position.
        raise TargetError(f"{what} {path.name}: not JSON ({exc})") from None


def load_target(path: Path) -> Target:
    """Read and validate a target file."""
    return parse_target(_read_json(path, "target file"), what=f"target file {path.name}")


def load_config(path: Path) -> EvaluationConfigSpec:
    """Read and validate an evaluation config file."""
    return parse_config(_read_json(path, "config file"), what=f"config file {path.name}")


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _reveal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_reveal(item) for item in value]
    return value


def request_body(spec: Target | EvaluationConfigSpec) -> dict[str, Any]:
    """The JSON body for the API, keys revealed. Do not log it."""
    body: dict[str, Any] = _reveal(spec.model_dump(mode="python", exclude_none=True))
    return body


def _secret_values(value: Any, key: str = "") -> Iterator[str]:
    if isinstance(value, SecretStr):
        yield value.get_secret_value()
    elif isinstance(value, BaseModel):
        yield from _secret_values(value.model_dump(mode="python"), key)
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _secret_values(item, str(name))
    elif isinstance(value, list):
        for item in value:
            yield from _secret_values(item, key)
    elif isinstance(value, str) and _SECRET_KEY.search(key):
        yield value


def collect_secrets(*specs: Any) -> list[str]:
    """Every API key (and other secret-named value) in targets, configs or plain JSON objects."""
    found = {secret for spec in specs for secret in _secret_values(spec)}
    return sorted((s for s in found if len(s) >= _MIN_SECRET_CHARS and set(s) != {"*"}), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret replaced by ``[redacted]``."""
    for secret in secrets:
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    return text


# --- what a stored or local target says about itself, for provenance ---------------------------


def _model_id(model: Any) -> str | None:
    if isinstance(model, str):
        return model
    if isinstance(model, dict):
        endpoint = model.get("api_endpoint")
        if isinstance(endpoint, dict) and isinstance(endpoint.get("model_id"), str):
            return str(endpoint["model_id"])
        if isinstance(model.get("name"), str) and isinstance(model.get("namespace"), str):
            return f"{model['namespace']}/{model['name']}"
    return None


def evaluated_model(target: dict[str, Any]) -> str | None:
    """The model a target evaluates: the LLM, or a retriever's query embedding model."""
    kind = target.get("type")
    if kind == "model":
        return _model_id(target.get("model"))
    if kind == "rag":
        pipeline = (target.get("rag") or {}).get("pipeline") or {}
        return _model_id(pipeline.get("model"))
    if kind == "retriever":
        pipeline = (target.get("retriever") or {}).get("pipeline") or {}
        return _model_id(pipeline.get("query_embedding_model"))
    return None


def endpoints(value: Any, path: str = "") -> dict[str, tuple[str | None, str | None]]:
    """``{path: (url, model_id)}`` of every api_endpoint in a target, keys left out."""
    found: dict[str, tuple[str | None, str | None]] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "api_endpoint" and isinstance(item, dict):
                found[where] = (item.get("url"), item.get("model_id"))
            else:
                found.update(endpoints(item, where))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.update(endpoints(item, f"{path}[{index}]"))
    return found


def judge_model(config: dict[str, Any]) -> str | None:
    """The judge model an LLM-as-a-judge config names (``...judge.model``), if any."""
    stack: list[Any] = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            judge = value.get("judge")
            if isinstance(judge, dict):
                found = _model_id(judge.get("model"))
                if found:
                    return found
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
    return None
