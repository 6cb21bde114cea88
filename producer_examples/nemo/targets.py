"""Evaluation targets and configs, validated before anything is sent to NeMo Evaluator.

**The shape is the client's.** The fields a target or a config may have, which are required, and
their types are read from the ``nemo-microservices`` client's own request types
(``TargetCreateParams``, ``ConfigCreateParams`` and everything they reference), when this module is
first used: a field the API takes is accepted here, with the client version installed, and a field
the client does not know is refused with its path and the fields allowed there. Checked against
nemo-microservices 1.5.0. The client's types are open in two ways the API is not, and so is this
validation: an unknown field (the client's ``TypedDict`` would let it through) is refused, and a
value of the wrong JSON type is refused, not coerced (``"5"`` is not an integer).

**Our rules on top**, each a fact of the API or of NVIDIA's "Create and Manage Evaluation Targets"
guide that the types do not carry:

* the section named by ``type`` is required (``model`` for a ``model`` target, ...), and another
  type's section is refused; ``rows`` is not empty;
* a retriever or RAG section is a ``pipeline`` or ``cached_outputs`` (exactly one), optionally with a
  ``dataset``; a retriever's ``top_k`` is a positive integer;
* a model given as an object has an ``api_endpoint`` or the ``name`` of a model entity; an LLM's
  (the ``model`` of a ``model`` target or of a RAG pipeline) ``url`` is its completions or
  chat-completions URL;
* URLs are not the guide's ``<placeholders>``; ``api_endpoint.url`` is http(s); ``files_url`` is
  ``hf://``, ``nds://``, ``s3://``, ``file://`` or ``http(s)://``;
* ``api_endpoint`` is not nested inside ``api_endpoint`` (as in the guide's last two RAG examples):
  the error names the fix;
* a target or config has a ``name`` (it is reused by ``namespace/name``), both entity names.

API keys (every string field whose name says key, password, secret or token) are
:class:`pydantic.SecretStr`: ``repr`` and ``str`` show ``**********``, validation errors are
formatted without input values, and :func:`request_body` is the only place a key is revealed, to put
it in the request. :func:`collect_secrets` gives the keys of a target or config to the log
redactor, and :func:`redact_client_logs` keeps them out of the client's own debug logs.
"""

from __future__ import annotations

import collections.abc
import datetime
import functools
import json
import logging
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, Required, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from nemo_microservices.types.cached_outputs_data_param import CachedOutputsDataParam
from nemo_microservices.types.dataset_ev_param import DatasetEvParam
from nemo_microservices.types.evaluation.config_create_params import ConfigCreateParams
from nemo_microservices.types.evaluation.target_create_params import TargetCreateParams
from nemo_microservices.types.model_ev_param import ModelEvParam
from nemo_microservices.types.rag_pipeline_data_param import RagPipelineDataParam
from nemo_microservices.types.rag_target_param import RagTargetParam
from nemo_microservices.types.retriever_pipeline_data_param import RetrieverPipelineDataParam
from nemo_microservices.types.retriever_target_param import RetrieverTargetParam
from nemo_microservices.types.shared_params.api_endpoint_data import APIEndpointData
from nemo_microservices.types.target_type import TargetType
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    PlainValidator,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import is_typeddict

from producer_examples.nemo.errors import TargetError

CLIENT_CHECKED = "nemo-microservices 1.5.0"  # the client version the shape was last checked against
NESTED_ENDPOINT_FIX = "move url/model_id up one level: model.api_endpoint.url"
REDACTED = "[redacted]"
TARGET_TYPES: tuple[str, ...] = get_args(TargetType)  # model, cached_outputs, retriever, rag, rows, dataset
FILES_URL_SCHEMES = ("hf", "nds", "s3", "file", "http", "https")

_SECRET_KEY = re.compile(r"(api[_-]?key|password|passwd|secret|token|authorization)", re.IGNORECASE)
# A field or key that holds a secret ("api_key", "Authorization", "x-api-key"), by its whole name or
# its last word: not "max_tokens" nor "idempotency_key", which a debug log should keep.
_SECRET_NAME = re.compile(r"(^|[_-])(api[_-]?key|password|passwd|secret|token|authorization)$", re.IGNORECASE)
_MIN_SECRET_CHARS = 4
_SHOWN_CHARS = 80  # of a bad value quoted in a message
_SHOWN_ERRORS = 10  # validation errors listed; the rest are counted

# NeMo entity names are path segments (``namespace/name``): no slash, no spaces or control characters.
EntityName = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")]

# --- the shape, from the client's types --------------------------------------------------------

# A union is validated as the member the input's JSON kind selects, so that an error speaks of that
# member only; these tags are left out of error locations.
_KIND_TAGS = {"string": "(string)", "object": "(object)", "list": "(list)", "integer": "(integer)",
              "number": "(number)", "boolean": "(boolean)"}
_TAGS = frozenset(_KIND_TAGS.values())


def _masked(value: Any) -> Any:
    """``value`` with every string under a secret-named key shown as stars, for ``repr``."""
    if isinstance(value, Mapping):
        return {k: "**********" if isinstance(k, str) and _SECRET_KEY.search(k) and isinstance(v, str) else _masked(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


class _ClientShaped(BaseModel):
    """Base of every model built from a client type: closed, frozen, keys hidden from ``repr``."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if value is not None:  # the client's types have dozens of optional fields
                yield name, _masked(value)


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str | SecretStr):
        return "string"
    if isinstance(value, Mapping | BaseModel):  # a model: when it is serialised
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return None


def _kind_of_type(tp: Any) -> str | None:
    """The JSON kind a converted type takes, if it takes exactly one."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _kind_of_type(get_args(tp)[0])
    if (isinstance(tp, type) and issubclass(tp, BaseModel)) or origin is dict:
        return "object"
    if origin is list:
        return "list"
    if origin is Literal:
        kinds = {_kind(v) for v in get_args(tp)}
        return kinds.pop() if len(kinds) == 1 else None
    return {str: "string", SecretStr: "string", bool: "boolean", int: "integer", float: "number"}.get(tp)


def _discriminated(members: list[Any]) -> Any:
    """One of ``members``, chosen by the JSON kind of the input (an int also picks a number member)."""
    by_kind: dict[str, Any] = {}
    for member in members:
        kind = _kind_of_type(member)
        if kind is None or kind in by_kind:
            return Union[tuple(members)]  # noqa: UP007  (kinds overlap: pydantic's smart union)
        by_kind[kind] = member
    names = " or ".join("an object" if k == "object" else f"a {k}" for k in by_kind)

    def pick(value: Any) -> str | None:
        kind = _kind(value)
        if kind == "integer" and kind not in by_kind and "number" in by_kind:
            kind = "number"
        return _KIND_TAGS[kind] if kind in by_kind else None

    tagged = tuple(Annotated[member, Tag(_KIND_TAGS[kind])] for kind, member in by_kind.items())
    return Annotated[Union[tagged], Discriminator(  # noqa: UP007
        pick, custom_error_type="wrong_kind", custom_error_message=f"Input should be {names}")]


_Role = Literal["", "llm"]
# Where a model is an LLM, whose endpoint is a completions URL; the role passes down to its endpoint.
_LLM_AT = frozenset({(TargetCreateParams, "model"), (RagPipelineDataParam, "model")})
_ROLE_PASSES = frozenset({(ModelEvParam, "api_endpoint")})


class _Builder:
    """Builds closed pydantic models from the client's ``TypedDict`` request types, once per type and role."""

    def __init__(self, checks: Mapping[tuple[type, _Role], Mapping[str, Any]]) -> None:
        self._checks = checks
        self._built: dict[tuple[type, _Role], type[BaseModel]] = {}

    def model(self, td: type, role: _Role = "", *, base: type[BaseModel] = _ClientShaped,
              keep: frozenset[str] = frozenset()) -> type[BaseModel]:
        """``td`` as a model; fields named in ``keep`` are the ``base``'s own."""
        if (td, role) in self._built:
            return self._built[(td, role)]
        fields: dict[str, Any] = {}
        for name, hint in get_type_hints(td, include_extras=True).items():
            if name in keep:
                continue
            required = get_origin(hint) is Required
            if get_origin(hint) in (Required, NotRequired):
                hint = get_args(hint)[0]
            child: _Role = "llm" if (td, name) in _LLM_AT else role if (td, name) in _ROLE_PASSES else ""
            secret = _SECRET_NAME.search(name) is not None and _strip(hint) is str
            annotation = SecretStr if secret else self._convert(hint, child)
            fields[name] = (annotation, ...) if required else (annotation | None, None)
        validators = {**self._checks.get((td, ""), {}), **(self._checks.get((td, role), {}) if role else {})}
        built: type[BaseModel] = create_model(
            f"{td.__name__}{role.title()}", __base__=base, __validators__=validators, __module__=__name__, **fields)
        self._built[(td, role)] = built
        return built

    def _convert(self, tp: Any, role: _Role) -> Any:
        origin, args = get_origin(tp), get_args(tp)
        if origin is Annotated:  # the client's serialisation hints (PropertyInfo): not ours
            return self._convert(args[0], role)
        if is_typeddict(tp):
            return self.model(tp, role)
        if origin in (Union, types.UnionType):
            members = [a for a in args if a is not datetime.datetime] or [str]  # a JSON file holds times as text
            entity = any(is_typeddict(a) for a in members)  # an object, or a string naming one stored
            converted = [_EntityRef if entity and a is str else self._convert(a, role) for a in members]
            return converted[0] if len(converted) == 1 else _discriminated(converted)
        if origin is Literal:
            return tp
        if origin in (dict, collections.abc.Mapping):
            return dict[self._convert(args[0], role), self._convert(args[1], role)]  # type: ignore[misc]
        if origin in (list, collections.abc.Iterable, collections.abc.Sequence):
            return list[self._convert(args[0], role)]  # type: ignore[misc]
        scalar = {str: StrictStr, bool: StrictBool, int: StrictInt, float: _Number, object: Any, typing.Any: Any}
        if tp in scalar:
            return scalar[tp]
        raise TypeError(f"the client's type {tp!r} has no conversion here; extend _Builder._convert")


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


# A JSON number: an integer stays one in the request (StrictFloat would send 1 as 1.0).
_Number = Annotated[float, PlainValidator(_number)]


def _entity_ref(value: str) -> str:
    if "<" in value or ">" in value:
        raise ValueError(f"{value[:_SHOWN_CHARS]!r} still contains a <placeholder> from the guide")
    if not value or any(c.isspace() for c in value):
        raise ValueError("the name of a stored entity (namespace/name) is not empty and has no spaces")
    return value


# The name of a stored model or dataset, where the client takes the object or its name.
_EntityRef = Annotated[StrictStr, AfterValidator(_entity_ref)]


def _strip(hint: Any) -> Any:
    while get_origin(hint) in (Annotated, Required, NotRequired):
        hint = get_args(hint)[0]
    return hint


# --- our rules ---------------------------------------------------------------------------------


def _check_url(value: str, *, schemes: tuple[str, ...], what: str) -> str:
    if "<" in value or ">" in value:
        raise ValueError(f"{what} {value[:_SHOWN_CHARS]!r} still contains a <placeholder> from the guide")
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path.strip("/")):
        raise ValueError(f"{what} must be a {'/'.join(schemes)} URL")
    return value


def _endpoint_not_nested(cls: type, data: Any) -> Any:
    if isinstance(data, Mapping) and "api_endpoint" in data:
        raise ValueError(
            "api_endpoint is nested inside api_endpoint (as in the last two RAG examples of NVIDIA's "
            f"target guide), which the API does not accept: {NESTED_ENDPOINT_FIX}"
        )
    return data


def _endpoint_url(cls: type, value: str) -> str:
    return _check_url(value, schemes=("http", "https"), what="url")


def _llm_url(cls: type, value: str) -> str:
    if not urlsplit(value).path.rstrip("/").endswith("/completions"):
        raise ValueError("an LLM's url must end with /completions or /chat/completions")
    return value


def _real_key(cls: type, value: SecretStr | None) -> SecretStr | None:
    if value is not None and (not value.get_secret_value() or set(value.get_secret_value()) == {"*"}):
        raise ValueError("api_key is empty or the API's masked echo (******); give the real key")
    return value


def _files_url(cls: type, value: str) -> str:
    return _check_url(value, schemes=FILES_URL_SCHEMES, what="files_url")


def _positive_top_k(cls: type, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError("top_k must be a positive integer")
    return value


def _model_named(self: BaseModel) -> BaseModel:
    if getattr(self, "api_endpoint", None) is None and getattr(self, "name", None) is None:
        raise ValueError("a model object needs its api_endpoint, or the name of a model entity")
    return self


def _one_source(self: BaseModel) -> BaseModel:
    if (getattr(self, "pipeline", None) is None) == (getattr(self, "cached_outputs", None) is None):
        raise ValueError("give exactly one of pipeline and cached_outputs (and optionally a dataset)")
    return self


# Named apart from every field: a validator named like a field would be replaced by it.
_CHECKS: dict[tuple[type, _Role], dict[str, Any]] = {
    (APIEndpointData, ""): {
        "check_not_nested": model_validator(mode="before")(_endpoint_not_nested),
        "check_http_url": field_validator("url")(_endpoint_url),
        "check_real_key": field_validator("api_key")(_real_key),
    },
    (APIEndpointData, "llm"): {"check_llm_url": field_validator("url")(_llm_url)},
    (ModelEvParam, ""): {"check_named": model_validator(mode="after")(_model_named)},
    (CachedOutputsDataParam, ""): {"check_files_url": field_validator("files_url")(_files_url)},
    (DatasetEvParam, ""): {"check_files_url": field_validator("files_url")(_files_url)},
    (RetrieverPipelineDataParam, ""): {"check_top_k": field_validator("top_k")(_positive_top_k)},
    (RetrieverTargetParam, ""): {"check_one_source": model_validator(mode="after")(_one_source)},
    (RagTargetParam, ""): {"check_one_source": model_validator(mode="after")(_one_source)},
}


class TargetSpec(_ClientShaped):
    """A target as ``POST /v1/evaluation/targets`` takes it. The other fields are the client's."""

    type: str
    name: EntityName
    namespace: EntityName = "default"

    @property
    def ref(self) -> str:
        """``namespace/name``: how jobs and the API address the target."""
        return f"{self.namespace}/{self.name}"

    @model_validator(mode="after")
    def _its_section(self) -> TargetSpec:
        """The section named by ``type`` is given (``rows`` not empty), and no other type's section."""
        if getattr(self, self.type, None) is None:
            raise PydanticCustomError("section", "{section}: Field required (by a target of type {section})",
                                      {"section": self.type})
        if self.type == "rows" and not getattr(self, "rows", None):
            raise PydanticCustomError("section", "rows: give at least one row")
        others = [kind for kind in TARGET_TYPES if kind != self.type and getattr(self, kind, None) is not None]
        if others:
            raise PydanticCustomError("section", "{others}: not taken by a target of type {kind}",
                                      {"others": ", ".join(others), "kind": self.type})
        return self


class EvaluationConfigSpec(_ClientShaped):
    """An evaluation config as ``POST /v1/evaluation/configs`` takes it. The other fields are the client's."""

    type: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=255)]
    name: EntityName
    namespace: EntityName = "default"

    # Read by provenance; the client's own declarations replace these in the built model.
    tasks: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __repr__(self) -> str:  # free-form params may hold a judge's key under any name: never print them
        return f"EvaluationConfigSpec(ref={self.ref!r}, type={self.type!r}, tasks={sorted(self.tasks or {})!r})"

    __str__ = __repr__


Target = TargetSpec
_ENTITY = frozenset({"name", "namespace"})


@functools.cache
def _shapes() -> tuple[type[TargetSpec], type[EvaluationConfigSpec]]:
    """The target and config models, built from the client's types on first use."""
    builder = _Builder(_CHECKS)
    target = builder.model(TargetCreateParams, base=TargetSpec, keep=_ENTITY)
    config = builder.model(ConfigCreateParams, base=EvaluationConfigSpec, keep=_ENTITY | {"type"})
    return typing.cast(type[TargetSpec], target), typing.cast(type[EvaluationConfigSpec], config)


# --- errors ------------------------------------------------------------------------------------


def _inner(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _step(tp: Any, part: str | int) -> Any:
    """The type found at ``part`` (a field, a key, an index or a union tag) inside ``tp``, or None."""
    tp = _inner(tp)
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(part))
        return field.annotation if field is not None else None
    if origin in (Union, types.UnionType):
        for member in args:
            tags = get_args(member)[1:] if get_origin(member) is Annotated else ()
            if any(isinstance(t, Tag) and t.tag == part for t in tags):
                return get_args(member)[0]
            if member is not type(None) and (found := _step(member, part)) is not None:
                return found
        return None
    if origin is list and isinstance(part, int):
        return args[0]
    if origin is dict and isinstance(part, str):
        return args[1]
    return None


def _allowed_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    tp: Any = root
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return []
    tp = _inner(tp)
    for candidate in (tp, *get_args(tp)):  # an optional model
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return sorted(candidate.model_fields)
    return []


def _format_errors(exc: ValidationError, what: str, root: type[BaseModel]) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False)[:_SHOWN_ERRORS]:
        loc = tuple(error["loc"])
        location = ".".join(str(p) for p in loc if p not in _TAGS)
        if error["type"] == "extra_forbidden":
            allowed = _allowed_at(root, loc[:-1])
            message = f"unknown field; allowed here: {', '.join(allowed)}" if allowed else "unknown field"
        else:
            message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}" if location else message)
    more = exc.error_count() - len(lines)
    if more > 0:
        lines.append(f"and {more} more")
    return f"{what} is not valid:\n  " + "\n  ".join(lines)


def parse_target(data: Any, *, what: str = "target") -> Target:
    """Validate a target as the API takes it. Raises :class:`TargetError` (never with a key in it)."""
    if not isinstance(data, dict):
        raise TargetError(f"{what} must be a JSON object")
    if data.get("type") not in TARGET_TYPES:
        raise TargetError(f"{what} is not valid:\n  type: must be one of {', '.join(TARGET_TYPES)}")
    model, _ = _shapes()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # ``from None``: the pydantic error carries the input values, api keys included.
        raise TargetError(_format_errors(exc, what, model)) from None


def parse_config(data: Any, *, what: str = "config") -> EvaluationConfigSpec:
    """Validate an evaluation config as the API takes it. Raises :class:`TargetError`."""
    if not isinstance(data, dict):
        raise TargetError(f"{what} must be a JSON object")
    _, model = _shapes()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise TargetError(_format_errors(exc, what, model)) from None


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


# --- the client's own logs ----------------------------------------------------------------------


class ClientLogRedactor(logging.Filter):
    """Takes API keys out of the client's log records before any handler sees them.

    At DEBUG the client logs every request's options, the JSON body included (``Request options:
    {... 'json_data': {... 'api_key': ...}}``), and any handler (the publisher's, a test's, an
    application's) would print the key. In each record's arguments, a value under a secret-named key
    is replaced by ``[redacted]``, and so is every known secret in the message and its strings.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: list[str] = []

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({*self._secrets, *(s for s in secrets if len(s) >= _MIN_SECRET_CHARS)},
                               key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, self._secrets)
        if isinstance(value, Mapping):
            return {k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) and v else self._clean(v)
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value) if isinstance(value, tuple) else [
                self._clean(v) for v in value]
        if isinstance(value, BaseModel):
            return self._clean(value.model_dump(mode="json"))
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, self._secrets)
        if isinstance(record.args, Mapping | tuple):
            record.args = self._clean(record.args)
        return True


_CLIENT_LOGGERS = ("nemo_microservices", "httpx", "httpcore")
_CLIENT_REDACTOR = ClientLogRedactor()


def redact_client_logs(secrets: Iterable[str] = ()) -> None:
    """Keep keys out of the logs of the ``nemo-microservices`` client and of httpx, at every level.

    Installs :class:`ClientLogRedactor` on each of their loggers (a logger's filter sees only the
    records logged on that logger, not its children's) and teaches it ``secrets``. Idempotent.
    """
    _CLIENT_REDACTOR.add(secrets)
    names = {*_CLIENT_LOGGERS, *(n for n in logging.Logger.manager.loggerDict if n.split(".")[0] in _CLIENT_LOGGERS)}
    for name in sorted(names):
        logger = logging.getLogger(name)
        if _CLIENT_REDACTOR not in logger.filters:
            logger.addFilter(_CLIENT_REDACTOR)


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
    """The judge model an LLM-as-a-judge config names, if any.

    Two documented places: a task's ``params.judge.model`` (the MT-bench style task), and an
    ``llm-judge`` metric's ``params.model`` (custom evaluations).
    """
    stack: list[Any] = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            judge = value.get("judge")
            if isinstance(judge, dict):
                found = _model_id(judge.get("model"))
                if found:
                    return found
            params = value.get("params")
            if value.get("type") == "llm-judge" and isinstance(params, dict):
                found = _model_id(params.get("model"))
                if found:
                    return found
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
    return None
