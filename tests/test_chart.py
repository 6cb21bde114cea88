"""The Helm chart (deploy/helm/evaljoin), rendered by a real Helm and checked as a cluster would see it.

Every scenario (the default values and each ``ci/*-values.yaml``) is linted with ``helm lint
--strict``, validated against the Kubernetes schemas of a current release (kubernetes-validate) and
scanned by checkov. The behaviour tests read the rendered objects: what the pod is given must be
exactly what the service's settings read, secrets stay out of the ConfigMap, selectors never move.
The objects of KEDA and the Prometheus Operator are validated against those projects' own CRDs
(tests/crds, vendored), as the API server would validate them. The tools come from
scripts/setup.sh (helm in .cache/bin, the rest in .cache/venv-chart); YAML is parsed there too.
"""

from __future__ import annotations

import ast
import base64
import copy
import functools
import inspect
import json
import re
import shlex
import shutil
import subprocess
import traceback
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import SecretStr, ValidationError

import consumer.config
from consumer.config import Settings, load_settings

ROOT = Path(__file__).parent.parent
CHART = ROOT / "deploy" / "helm" / "evaljoin"
HELM = ROOT / ".cache" / "bin" / "helm"
TOOLS = ROOT / ".cache" / "venv-chart" / "bin"
KUBERNETES_VERSION = "1.37.0"
RELEASE, NAMESPACE = "evaljoin", "llmobs"
SCENARIOS = ["default", *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]
CRDS = ROOT / "tests" / "crds"
RULES = sorted((ROOT / "tests" / "chart-rules").glob("*.yaml"))
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
SETTINGS = {name.upper() for name in Settings.model_fields}
SECRET_SETTINGS = {name.upper() for name, field in Settings.model_fields.items()
                   if SecretStr in getattr(field.annotation, "__args__", (field.annotation,))}
# Set by the chart from the pod itself, never from values.
POD_SETTINGS = {"KAFKA_GROUP_INSTANCE_ID"}
# Not settings, but read: where the secret files are, and what ddtrace reads when self-tracing.
SECRETS_DIR_VARIABLE = "EVALJOIN_SECRETS_DIR"
# Read from the downward API in StatefulSet mode, only to make KAFKA_GROUP_INSTANCE_ID of.
DOWNWARD_API_VARIABLES = {"EVALJOIN_POD_NAMESPACE", "EVALJOIN_POD_NAME"}
DDTRACE_TAG_VARIABLES = {"DD_ENV", "DD_SERVICE", "DD_VERSION"}


# -- tools ---------------------------------------------------------------------------------------


def tool(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run scripts/setup.sh --chart-tools")
    return path


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def yaml_documents(text: str) -> list[Any]:
    """Parse YAML (one or many documents) with the chart tools' PyYAML."""
    python = tool(TOOLS / "python")
    code = ("import json, sys, yaml; "
            "json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)")
    done = subprocess.run([str(python), "-c", code], input=text, capture_output=True, text=True, timeout=60,
                          check=True)
    return list(json.loads(done.stdout))


def values_file(scenario: str) -> list[str]:
    return [] if scenario == "default" else ["-f", str(CHART / "ci" / scenario)]


def helm_template(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return run(tool(HELM), "template", RELEASE, chart, "--namespace", NAMESPACE, *args)


@functools.cache
def _render(args: tuple[str, ...]) -> str:
    done = helm_template(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@functools.cache
def _parsed(args: tuple[str, ...]) -> list[dict[str, Any]]:
    return yaml_documents(_render(args))


def render(*args: str) -> list[dict[str, Any]]:
    """The chart's objects for these helm arguments (values files, --set)."""
    return copy.deepcopy(_parsed(tuple(args)))


def render_scenario(scenario: str, *more: str) -> list[dict[str, Any]]:
    return render(*values_file(scenario), *more)


def scenario_values(scenario: str) -> dict[str, Any]:
    values = yaml_documents((CHART / "values.yaml").read_text())[0]
    if scenario != "default":
        values = merge(values, yaml_documents((CHART / "ci" / scenario).read_text())[0])
    return dict(values)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert len(found) == 1
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in WORKLOAD_KINDS]
    return specs + [d["spec"] for d in docs if d["kind"] == "Pod"]


def consumer_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = workload(docs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_names(container: dict[str, Any], docs: list[dict[str, Any]]) -> set[str]:
    """Every variable the container gets: its ConfigMaps' keys and its own env."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    return names


def secrets_volume(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The volume of the consumer's secret settings, if it mounts any."""
    volumes = [v for v in workload(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets"]
    return volumes[0] if volumes else None


def helm_fails(*args: str) -> str:
    done = helm_template(*args)
    assert done.returncode != 0, "rendered, but should have been refused"
    return done.stderr


# -- lint, schemas, static analysis ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict_is_clean(scenario: str) -> None:
    """`helm lint --strict` passes for the scenario with no warning or error."""
    done = run(tool(HELM), "lint", "--strict", CHART, *values_file(scenario))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_are_valid_kubernetes_objects(scenario: str, tmp_path: Path) -> None:
    """Every built-in object validates strictly against the Kubernetes schemas; only the known CRDs have none."""
    rendered = tmp_path / "manifests.yaml"
    rendered.write_text(_render(tuple(values_file(scenario))))
    done = run(tool(TOOLS / "kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSION,
               rendered)
    assert done.returncode == 0, done.stdout + done.stderr
    unvalidated = set(re.findall(r"Couldn't find schema for kind (\w+)", done.stdout + done.stderr))
    assert unvalidated == kinds(render_scenario(scenario)) & {kind for _, kind in crd_schemas()}


@functools.cache
def crd_schemas() -> dict[tuple[str, str], tuple[bool, dict[str, Any]]]:
    """(apiVersion, kind) -> (namespaced, openAPIV3Schema) of each served version of the vendored CRDs."""
    found: dict[tuple[str, str], tuple[bool, dict[str, Any]]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml_documents(path.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                if version["served"]:
                    schema = _as_the_api_server_validates(version["schema"]["openAPIV3Schema"])
                    found[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = (
                        spec["scope"] == "Namespaced", schema)
    return found


def _as_the_api_server_validates(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema, refusing unknown fields as `kubectl apply` does.

    The API server's strict field validation (kubectl's default) refuses a field a CRD does not declare,
    unless the object preserves unknown fields; `nullable` allows null; int-or-string takes either.
    """
    if isinstance(schema, list):
        return [_as_the_api_server_validates(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _as_the_api_server_validates(value) for key, value in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("type", ["integer", "string"])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """What the API server would refuse in an object of a vendored CRD's kind: its schema, name and scope."""
    namespaced, schema = crd_schemas()[(doc["apiVersion"], doc["kind"])]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft4Validator(schema).iter_errors(doc)]
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", doc["metadata"].get("name", "")):
        errors.append(f"metadata.name {doc['metadata'].get('name')!r} is not a DNS subdomain")
    if namespaced != ("namespace" in doc["metadata"]):
        errors.append("a namespaced kind needs metadata.namespace; a cluster-scoped one has none")
    return errors


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_custom_resources_are_valid_against_their_crds(scenario: str) -> None:
    """Every KEDA and Prometheus Operator object validates against its project's CRD, unknown fields refused."""
    for doc in render_scenario(scenario):
        group = doc["apiVersion"].rpartition("/")[0]
        if "." not in group or group.endswith(".k8s.io"):
            continue  # built in: kubernetes-validate checks it
        assert (doc["apiVersion"], doc["kind"]) in crd_schemas(), f"no CRD vendored for {doc['kind']}"
        assert crd_errors(doc) == [], (doc["kind"], doc["metadata"]["name"])


def test_crd_validation_catches_what_the_api_server_refuses() -> None:
    """The CRD check refuses a null spec, an unknown field and a wrong type, so a pass means something."""
    auth: dict[str, Any] = {"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
                            "metadata": {"name": "evaljoin", "namespace": NAMESPACE}, "spec": None}
    assert any("None is not of type 'object'" in e for e in crd_errors(auth))
    auth["spec"] = {"secretTargetRef": [{"parameter": "ca", "name": "ca", "key": "ca.crt", "namespace": "x"}]}
    assert any("'namespace' was unexpected" in e for e in crd_errors(auth))
    scaled = one(render_scenario("keda-values.yaml"), "ScaledObject")
    scaled["spec"]["maxReplicaCount"] = "12"
    assert any("'12' is not of type 'integer'" in e for e in crd_errors(scaled))
    del scaled["metadata"]["namespace"]
    assert any("metadata.namespace" in e for e in crd_errors(scaled))


@pytest.fixture(scope="module")
def rendered_scenarios(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rendered")
    for scenario in SCENARIOS:
        (directory / f"{scenario.removesuffix('.yaml')}.yaml").write_text(_render(tuple(values_file(scenario))))
    return directory


def checkov(directory: Path, *args: str) -> dict[str, Any]:
    # --skip-download: checkov otherwise fetches guidelines from its vendor's API.
    done = run(tool(TOOLS / "checkov"), "--directory", directory, "--framework", "kubernetes", "--skip-download",
               "--output", "json", "--quiet", *args, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    return dict(report[0] if isinstance(report, list) else report)


def test_checkov_finds_nothing_in_any_scenario(rendered_scenarios: Path) -> None:
    """checkov over every rendered scenario, with the chart's .checkov.yaml, reports no failed check."""
    report = checkov(rendered_scenarios, "--config-file", str(CHART / ".checkov.yaml"))
    failed = [(f["check_id"], f["resource"], f["file_path"]) for f in report["results"]["failed_checks"]]
    assert failed == []
    assert report["summary"]["passed"] > 0


def test_every_checkov_skip_is_needed_and_explained(rendered_scenarios: Path) -> None:
    """Each check .checkov.yaml skips fails without the skip, and a comment above it gives the reason."""
    config = (CHART / ".checkov.yaml").read_text()
    skipped = set(re.findall(r"^\s*-\s*(CKV\w+)", config, flags=re.MULTILINE))
    report = checkov(rendered_scenarios)
    failing = {f["check_id"] for f in report["results"]["failed_checks"]}
    assert failing == skipped
    comments = "\n".join(line for line in config.splitlines() if line.lstrip().startswith("#"))
    for check in skipped:
        assert check in comments, f"{check} is skipped without a reason"


# -- one source of truth: the settings ----------------------------------------------------------------


def test_chart_keys_are_exactly_the_services_settings() -> None:
    """`config`, `secrets` and the pod-set variables partition Settings.model_fields: none missing, none extra."""
    values = scenario_values("default")
    config, secrets = set(values["config"]), set(values["secrets"])
    assert config.isdisjoint(secrets)
    assert secrets == SECRET_SETTINGS
    assert config | secrets | POD_SETTINGS == SETTINGS
    assert set(values["existingSecretKeys"]) == SECRET_SETTINGS


def test_config_defaults_are_the_services_defaults() -> None:
    """Every default in values.yaml `config` is the service's own default for that setting."""
    for name, value in scenario_values("default")["config"].items():
        default = Settings.model_fields[name.lower()].default
        assert value == default, f"config.{name}: chart {value!r}, service {default!r}"


def _pydantic_property(name: str) -> tuple[str, dict[str, Any]]:
    schema = Settings.model_json_schema()["properties"][name.lower()]
    variants = [v for v in schema.get("anyOf", [schema]) if v.get("type") != "null"]
    assert len(variants) == 1
    variant = dict(variants[0])
    kind = "string" if "enum" in variant or "const" in variant else variant["type"]
    if "const" in variant:
        variant["enum"] = [variant["const"]]
    return kind, variant


def test_values_schema_types_each_setting_as_the_service_does() -> None:
    """The values schema gives each config key the service's type, choices and limits (or stricter ones)."""
    properties = json.loads((CHART / "values.schema.json").read_text())["properties"]["config"]["properties"]
    assert set(properties) == SETTINGS - SECRET_SETTINGS - POD_SETTINGS
    for name, chart in properties.items():
        kind, service = _pydantic_property(name)
        chart_types = chart["type"] if isinstance(chart["type"], list) else [chart["type"]]
        assert [t for t in chart_types if t != "null"] == [kind], name
        assert [v for v in chart.get("enum", [None]) if v is not None] == service.get("enum", []), name
        for key in ("pattern", "minLength", "maxLength"):
            if key in service:
                assert chart.get(key) == service[key], (name, key)
        assert _lower_bound_at_least_as_strict(chart, service), name
        if "maximum" in service:
            assert chart.get("maximum", float("inf")) <= service["maximum"], name


def _lower_bound_at_least_as_strict(chart: dict[str, Any], service: dict[str, Any]) -> bool:
    if "minimum" in service:
        return bool(chart.get("minimum", float("-inf")) >= service["minimum"]
                    or chart.get("exclusiveMinimum", float("-inf")) >= service["minimum"])
    if "exclusiveMinimum" in service:
        return bool(chart.get("exclusiveMinimum", float("-inf")) >= service["exclusiveMinimum"]
                    or chart.get("minimum", float("-inf")) > service["exclusiveMinimum"])
    return True


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_gets_only_what_the_service_reads(scenario: str) -> None:
    """The consumer container's variables are settings the service reads, plus where its secret files are."""
    docs = render_scenario(scenario)
    names = env_names(consumer_container(docs), docs)
    assert names <= SETTINGS | {SECRETS_DIR_VARIABLE} | DOWNWARD_API_VARIABLES, names - SETTINGS
    assert names.isdisjoint(SECRET_SETTINGS), "secrets must come as files, not variables"


@pytest.mark.parametrize(("namespace", "release"), [("team-a", "evaljoin"), ("team-b", "evaljoin")])
def test_static_member_id_carries_the_namespace(namespace: str, release: str) -> None:
    """In StatefulSet mode KAFKA_GROUP_INSTANCE_ID is <namespace>-<pod name> from the downward API, so the same
    release in two namespaces gives two member ids, and the pods' session timeout is workload.sessionTimeoutMs."""
    done = run(tool(HELM), "template", release, CHART, "--namespace", namespace, "--set", "workload.kind=StatefulSet",
               "--set", "workload.sessionTimeoutMs=180000")
    assert done.returncode == 0, done.stderr
    docs = yaml_documents(done.stdout)
    env = {e["name"]: e for e in consumer_container(docs)["env"]}
    assert env["EVALJOIN_POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["EVALJOIN_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KAFKA_GROUP_INSTANCE_ID"]["value"] == "$(EVALJOIN_POD_NAMESPACE)-$(EVALJOIN_POD_NAME)"
    names = [e["name"] for e in consumer_container(docs)["env"]]
    assert names.index("KAFKA_GROUP_INSTANCE_ID") > max(names.index("EVALJOIN_POD_NAMESPACE"),
                                                        names.index("EVALJOIN_POD_NAME"))
    assert env["KAFKA_SESSION_TIMEOUT_MS"]["value"] == "180000"
    assert workload(docs)["metadata"]["namespace"] == namespace
    assert "KAFKA_GROUP_INSTANCE_ID" not in env_names({"envFrom": consumer_container(docs)["envFrom"]}, docs)


def test_heartbeat_must_fit_three_times_in_the_session_timeout() -> None:
    """The chart refuses a heartbeat above a third of the session timeout the pods get, naming where it comes from."""
    error = helm_fails("--set", "workload.kind=StatefulSet", "--set", "workload.sessionTimeoutMs=6000",
                       "--set", "config.KAFKA_HEARTBEAT_INTERVAL_MS=3000")
    assert "KAFKA_HEARTBEAT_INTERVAL_MS (3000) must be at most a third of KAFKA_SESSION_TIMEOUT_MS (6000)" in error
    assert "workload.sessionTimeoutMs, for a StatefulSet" in error


def test_self_tracing_adds_exactly_the_tags_ddtrace_reads() -> None:
    """With DD_TRACE_ENABLED the pod also gets DD_ENV, DD_SERVICE, DD_VERSION, each from its own UST label."""
    docs = render("--set", "config.DD_TRACE_ENABLED=true", "--set", "datadog.env=prod")
    container = consumer_container(docs)
    names = env_names(container, docs)
    assert names - SETTINGS - {SECRETS_DIR_VARIABLE} == DDTRACE_TAG_VARIABLES
    labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    for entry in container["env"]:
        if entry["name"] in DDTRACE_TAG_VARIABLES:
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            assert label and label.group(1) in labels, path


def _materialize_secret(directory: Path, files: dict[str, str]) -> None:
    """Lay secret files out as the kubelet does: a timestamped dir, ..data pointing at it, links to ..data."""
    stamp = directory / "..2026_01_01_00_00_00.000000000"
    stamp.mkdir(parents=True)
    for name, value in files.items():
        (stamp / name).write_text(value)
    (directory / "..data").symlink_to(stamp.name)
    for name in files:
        (directory / name).symlink_to(f"..data/{name}")


FAKE_EXISTING_SECRET = {"api-key": "fedcba9876543210fedcba9876543210", "kafka-password": "msk-password",
                        "redis-url": "rediss://default:from-vault@redis.example.internal:6380/0"}
POD_NAME, NODE_IP = f"{RELEASE}-0", "10.1.2.3"
PARTITIONS_3_3 = ["--set", "kafkaPartitions.spanTopic=3", "--set", "kafkaPartitions.resultTopic=3"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_service_reads_every_value_as_given(scenario: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's ConfigMap, env and mounted secret files load into Settings holding exactly the chart's values."""
    docs = render_scenario(scenario)
    values = scenario_values(scenario)
    container = consumer_container(docs)
    for name in [*SETTINGS, SECRETS_DIR_VARIABLE]:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    environment: dict[str, str] = {}
    for source in container["envFrom"]:
        environment |= one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    field_values = {"metadata.name": POD_NAME, "metadata.namespace": NAMESPACE, "status.hostIP": NODE_IP}
    for entry in container.get("env", []):
        if "value" in entry:  # $(NAME) refers to a variable defined before it, as the kubelet expands it
            value = re.sub(r"\$\(([A-Za-z0-9_]+)\)", lambda m: environment[m.group(1)], entry["value"])
        else:
            value = field_values[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        environment[entry["name"]] = value
    secret_files: dict[str, str] = {}
    volume = secrets_volume(docs)
    if volume is not None:
        if values["existingSecret"]:
            data = FAKE_EXISTING_SECRET
        else:
            secret = one(docs, "Secret", volume["secret"]["secretName"])
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        secret_files = {item["path"]: data[item["key"]] for item in volume["secret"]["items"]}
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert environment[SECRETS_DIR_VARIABLE] == mount["mountPath"]
        assert mount["readOnly"] is True
    secrets_dir = tmp_path / "secrets"
    if secret_files:
        _materialize_secret(secrets_dir, secret_files)
        environment[SECRETS_DIR_VARIABLE] = str(secrets_dir)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    statefulset = workload(docs)["kind"] == "StatefulSet"
    for name, value in values["config"].items():
        if value is not None and not (statefulset and name == "KAFKA_SESSION_TIMEOUT_MS"):
            assert getattr(settings, name.lower()) == value, name
    for name, value in secret_files.items():
        assert getattr(settings, name.lower()).get_secret_value() == value, name
    for name, value in values["secrets"].items():
        if value and not values["existingSecret"]:
            assert getattr(settings, name.lower()).get_secret_value() == value, name
    if one(docs, "ConfigMap", RELEASE)["data"].get("DD_LLMOBS_AGENTLESS_ENABLED") == "true":
        assert settings.dd_api_key is not None
    if any(e["name"] == "DD_AGENT_HOST" for e in container.get("env", [])):
        assert settings.dd_agent_host == NODE_IP
    if workload(docs)["kind"] == "StatefulSet":
        assert settings.kafka_group_instance_id == f"{NAMESPACE}-{POD_NAME}"
        assert settings.kafka_session_timeout_ms == values["workload"]["sessionTimeoutMs"]
    else:
        assert settings.kafka_group_instance_id is None


def test_large_numbers_reach_the_service_as_integers() -> None:
    """Whole numbers are rendered as integers (Helm reads them as floats and would print 1.048576e+06)."""
    data = one(render("--set-json", "config.MAX_MESSAGE_BYTES=16777216"), "ConfigMap")["data"]
    assert data["MAX_MESSAGE_BYTES"] == "16777216"
    assert one(render_scenario("default"), "ConfigMap")["data"]["INTAKE_MAX_BODY_BYTES"] == "4000000"


# -- secrets ------------------------------------------------------------------------------------


def test_api_key_is_in_the_secret_and_nowhere_else() -> None:
    """The Datadog API key is in the chart-made Secret, and in no ConfigMap, env var or other object."""
    docs = render_scenario("agentless-values.yaml")
    values = scenario_values("agentless-values.yaml")
    key, redis_url = values["secrets"]["DD_API_KEY"], values["secrets"]["REDIS_URL"]
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["DD_API_KEY"]).decode() == key
    configmap = one(docs, "ConfigMap")
    assert "DD_API_KEY" not in configmap["data"] and "REDIS_URL" not in configmap["data"]
    others = json.dumps([d for d in docs if d["kind"] != "Secret"])
    assert key not in others
    assert "redis-password" not in others
    assert redis_url not in others


def test_existing_secret_is_mounted_under_the_settings_names() -> None:
    """With existingSecret the chart makes no Secret and mounts the mapped keys the settings need as files."""
    docs = render_scenario("existingsecret-values.yaml")
    assert "Secret" not in kinds(docs)
    volume = secrets_volume(docs)
    assert volume is not None
    assert volume["secret"]["secretName"] == "evaljoin-credentials"
    items = {item["path"]: item["key"] for item in volume["secret"]["items"]}
    assert items == {"DD_API_KEY": "api-key", "KAFKA_SASL_PASSWORD": "kafka-password", "REDIS_URL": "redis-url"}


def test_existing_secret_mounts_only_the_keys_in_use() -> None:
    """An existing Secret need not hold an API key without agentless delivery, nor a password without SASL."""
    docs = render("--set", "existingSecret=creds")
    volume = secrets_volume(docs)
    assert volume is not None
    assert [item["path"] for item in volume["secret"]["items"]] == ["REDIS_URL"]


def test_redis_password_is_a_secret_file_from_either_secret() -> None:
    """REDIS_PASSWORD given in `secrets` is in the chart's Secret only; from an existing Secret, mounted once named."""
    own = render("--set", "secrets.REDIS_PASSWORD=redis-pw-4f2a", "--set", "config.REDIS_USERNAME=evaljoin")
    assert base64.b64decode(one(own, "Secret")["data"]["REDIS_PASSWORD"]).decode() == "redis-pw-4f2a"
    assert "redis-pw-4f2a" not in json.dumps([d for d in own if d["kind"] != "Secret"])
    assert one(own, "ConfigMap")["data"]["REDIS_USERNAME"] == "evaljoin"
    existing = render("--set", "existingSecret=creds", "--set", "existingSecretKeys.REDIS_PASSWORD=redis-password")
    volume = secrets_volume(existing)
    assert volume is not None
    assert {item["path"]: item["key"] for item in volume["secret"]["items"]} == {
        "REDIS_URL": "REDIS_URL", "REDIS_PASSWORD": "redis-password"}


def test_no_secret_and_no_secret_volume_when_none_is_given() -> None:
    """The default install makes no Secret and mounts none: the service keeps its own defaults."""
    docs = render_scenario("default")
    assert "Secret" not in kinds(docs)
    assert secrets_volume(docs) is None
    assert SECRETS_DIR_VARIABLE not in env_names(consumer_container(docs), docs)


def test_config_change_rolls_the_pods() -> None:
    """A changed setting changes the pod template (its config checksum), so the pods restart with it."""
    before = workload(render_scenario("default"))["spec"]["template"]["metadata"]["annotations"]
    after = workload(render("--set", "config.LOG_LEVEL=DEBUG"))["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/config"] != after["checksum/config"]


# -- schema and rules -----------------------------------------------------------------------------


def test_schema_rejects_a_string_where_a_number_belongs() -> None:
    """A string for a numeric setting is refused by the values schema, naming the value's path."""
    message = helm_fails("--set-string", "config.KAFKA_MAX_BATCH=500")
    assert "/config/KAFKA_MAX_BATCH" in message and "got string" in message
    assert "/replicaCount" in helm_fails("--set-string", "replicaCount=two")


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "config.KAFKA_BOOTSTRAP_SERVERS=null"], "missing property 'KAFKA_BOOTSTRAP_SERVERS'"),
    (["--set", "config.KAFKA_BOOTSTRAP_SERVER=kafka:9092"], "'KAFKA_BOOTSTRAP_SERVER' not allowed"),
    (["--set", "replicas=3"], "'replicas' not allowed"),
    (["--set", "image.repository="], "/image/repository"),
    (["--set", "config.LOG_LEVEL=TRACE"], "/config/LOG_LEVEL"),
    (["--set", "config.HEALTH_PORT=0"], "/config/HEALTH_PORT"),
    (["--set", "workload.kind=DaemonSet"], "/workload/kind"),
])
def test_schema_rejects_missing_unknown_and_invalid_values(args: list[str], expected: str) -> None:
    """Missing required settings, unknown keys and out-of-range values fail with a message naming them."""
    assert expected in helm_fails(*args)


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "autoscaling.keda.enabled=true", "--set", "autoscaling.hpa.enabled=true", *PARTITIONS_3_3],
     "choose one autoscaler"),
    (["--set", "autoscaling.keda.enabled=true"],
     "kafkaPartitions.spanTopic and kafkaPartitions.resultTopic are required"),
    (["--set", "autoscaling.keda.enabled=true", "--set", "kafkaPartitions.spanTopic=3"], "are required"),
    (["--set", "autoscaling.keda.enabled=true", *PARTITIONS_3_3, "--set", "autoscaling.maxReplicas=7"],
     "autoscaling.maxReplicas=7 is above the 6 partitions of both topics"),
    (["--set", "autoscaling.hpa.enabled=true", *PARTITIONS_3_3, "--set", "resources.requests.cpu=null"],
     "set resources.requests.cpu"),
    (["--set", "terminationGracePeriodSeconds=40"], "shorter than the shutdown needs"),
    (["--set", "config.HEALTH_HOST=127.0.0.1"], "the kubelet probes the pod's IP"),
    (["--set", "extraEnv[0].name=REDIS_URL", "--set", "extraEnv[0].value=x"], "a setting of the service"),
])
def test_rules_across_values_fail_with_a_readable_message(args: list[str], expected: str) -> None:
    """What the service would refuse at start (exit code 2), or the chart cannot honour, fails the render."""
    assert expected in helm_fails(*args)


def _rule_environment(values: dict[str, Any]) -> dict[str, str]:
    """What a pod of these values would be given (its ConfigMap and own secrets), as the chart renders them."""
    environment: dict[str, str] = {}
    for name, value in [*values["config"].items(), *values["secrets"].items()]:
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            environment[name] = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            environment[name] = str(int(value))
        else:
            environment[name] = str(value)
    if values["workload"]["kind"] == "StatefulSet":
        environment["KAFKA_SESSION_TIMEOUT_MS"] = str(values["workload"]["sessionTimeoutMs"])
    return environment


def _service_refusal(rule: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, tuple[str, int]]:
    """The service's message for a rule file's settings, and where (file, line) it raised it."""
    values = merge(scenario_values("default"), yaml_documents(rule.read_text())[0])
    with monkeypatch.context() as patch:
        for name in [*SETTINGS, SECRETS_DIR_VARIABLE]:
            patch.delenv(name, raising=False)
            patch.delenv(name.lower(), raising=False)
        for name, value in _rule_environment(values).items():
            patch.setenv(name, value)
        with pytest.raises(ValidationError) as refused:
            load_settings()
    (error,) = refused.value.errors()
    cause = error.get("ctx", {}).get("error")
    assert isinstance(cause, ValueError), error
    frame = traceback.extract_tb(cause.__traceback__)[-1]
    return str(cause), (Path(frame.filename).name, frame.lineno or 0)


def _rule_sites() -> set[tuple[str, int]]:
    """Every `raise ValueError` of the settings' model validators and of the functions of ours they call."""
    sites: set[tuple[str, int]] = set()
    modules = {Path(consumer.config.__file__).name: Path(consumer.config.__file__)}
    called: set[str] = set()
    trees = {}
    for path in (ROOT / "consumer").glob("*.py"):
        trees[path.name] = ast.parse(path.read_text())
    functions = {(name, node.name): node for name, tree in trees.items() for node in tree.body
                 if isinstance(node, ast.FunctionDef)}
    validators = [node for node in ast.walk(trees[next(iter(modules))]) if isinstance(node, ast.FunctionDef)
                  and any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "model_validator"
                          for d in node.decorator_list)]
    queue: list[tuple[str, ast.FunctionDef]] = [(next(iter(modules)), node) for node in validators]
    while queue:
        module, function = queue.pop()
        imported = {alias.asname or alias.name: f"{node.module.rpartition('.')[2]}.py"
                    for node in ast.walk(function) if isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith("consumer.") for alias in node.names}
        for node in ast.walk(function):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and getattr(
                    node.exc.func, "id", "") == "ValueError":
                sites.add((module, node.lineno))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in called:
                target = (imported.get(node.func.id, module), node.func.id)
                if target in functions:
                    called.add(node.func.id)
                    queue.append((target[0], functions[target]))
    return sites


@pytest.mark.parametrize("rule", RULES, ids=lambda path: path.stem)
def test_each_rule_of_the_settings_fails_the_render_with_the_services_message(
        rule: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A values file that breaks one of the service's rules fails `helm template` with the service's own message."""
    message, _ = _service_refusal(rule, monkeypatch)
    assert message in helm_fails("-f", str(rule))


def test_the_rule_files_reach_every_rule_of_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Together the rule files make the service raise at every `raise ValueError` its settings' validators have."""
    reached = {_service_refusal(rule, monkeypatch)[1] for rule in RULES}
    sites = _rule_sites()
    assert len(sites) > 25
    assert sites - reached == set(), "rules of the settings without a file in tests/chart-rules"
    assert reached <= sites


# -- labels and selectors -------------------------------------------------------------------------


def _selectors(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] in (*WORKLOAD_KINDS, "PodDisruptionBudget", "ServiceMonitor"):
            found[doc["kind"]] = spec["selector"]
        if doc["kind"] == "Service":
            found["Service"] = spec["selector"]
    return found


@pytest.mark.parametrize("scenario", ["default", "statefulset-values.yaml", "servicemonitor-values.yaml"])
def test_selector_labels_do_not_change_with_the_chart_version(scenario: str, tmp_path: Path) -> None:
    """Selectors carry only name and instance, so a new chart or app version upgrades without a new selector."""
    newer = tmp_path / "evaljoin"
    shutil.copytree(CHART, newer)
    chart_yaml = (newer / "Chart.yaml").read_text()
    chart_yaml = re.sub(r"^version: .*$", "version: 9.8.7", chart_yaml, flags=re.MULTILINE)
    chart_yaml = re.sub(r"^appVersion: .*$", 'appVersion: "9.8.7"', chart_yaml, flags=re.MULTILINE)
    (newer / "Chart.yaml").write_text(chart_yaml)
    done = helm_template(*values_file(scenario), chart=newer)
    assert done.returncode == 0, done.stderr
    old_docs, new_docs = render_scenario(scenario), yaml_documents(done.stdout)
    assert workload(old_docs)["metadata"]["labels"] != workload(new_docs)["metadata"]["labels"]
    assert _selectors(old_docs) == _selectors(new_docs)
    expected = {"app.kubernetes.io/name": "evaljoin", "app.kubernetes.io/instance": RELEASE}
    for kind, selector in _selectors(new_docs).items():
        assert selector.get("matchLabels", selector) == expected, kind
    pod_labels = workload(new_docs)["spec"]["template"]["metadata"]["labels"]
    assert expected.items() <= pod_labels.items()


def test_test_pod_is_not_adopted_by_the_workload() -> None:
    """The `helm test` pod runs `check` and does not match the workload's selector."""
    docs = render_scenario("default")
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["args"] == ["check"]
    assert pod["spec"]["restartPolicy"] == "Never"
    selector = workload(docs)["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= pod["metadata"]["labels"].items()
    consumer, check = consumer_container(docs), pod["spec"]["containers"][0]
    assert (consumer["envFrom"], consumer.get("env"), consumer["volumeMounts"]) == (
        check["envFrom"], check.get("env"), check["volumeMounts"])


# -- probes and shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "servicemonitor-values.yaml"])
def test_probes_follow_the_health_contract(scenario: str) -> None:
    """Startup and liveness probe /healthz, readiness /readyz, all on the port HEALTH_PORT configures."""
    docs = render_scenario(scenario)
    container = consumer_container(docs)
    port = int(one(docs, "ConfigMap")["data"]["HEALTH_PORT"])
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == port
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grace_period_covers_prestop_and_the_drain(scenario: str) -> None:
    """SIGKILL comes no earlier than the preStop sleep plus SHUTDOWN_TIMEOUT_SECONDS plus a margin."""
    docs = render_scenario(scenario)
    spec = workload(docs)["spec"]["template"]["spec"]
    container = consumer_container(docs)
    shutdown = float(one(docs, "ConfigMap", RELEASE)["data"]["SHUTDOWN_TIMEOUT_SECONDS"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    assert set(pre_stop) <= {"sleep"}, "a preStop hook may only wait"
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] >= sleep + shutdown + 10


def test_default_grace_period_is_derived_and_no_prestop() -> None:
    """By default there is no preStop hook and the grace period is the drain plus a 30 s margin."""
    container = consumer_container(render_scenario("default"))
    assert "lifecycle" not in container
    assert workload(render_scenario("default"))["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    spec = workload(render("--set", "config.SHUTDOWN_TIMEOUT_SECONDS=100", "--set", "preStopSleepSeconds=5"))
    assert spec["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 135


# -- workload kinds and scaling --------------------------------------------------------------------


def test_statefulset_uses_the_pod_name_for_static_membership() -> None:
    """In a StatefulSet KAFKA_GROUP_INSTANCE_ID is made of the pod's namespace and name; a Deployment never sets it."""
    docs = render_scenario("statefulset-values.yaml")
    statefulset = one(docs, "StatefulSet")
    env = {e["name"]: e for e in consumer_container(docs)["env"]}
    assert env["KAFKA_GROUP_INSTANCE_ID"]["value"] == "$(EVALJOIN_POD_NAMESPACE)-$(EVALJOIN_POD_NAME)"
    assert env["EVALJOIN_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert statefulset["spec"]["serviceName"] == one(docs, "Service")["metadata"]["name"]
    assert one(docs, "Service")["spec"]["clusterIP"] == "None"
    assert "Deployment" not in kinds(docs)
    default = render_scenario("default")
    assert "KAFKA_GROUP_INSTANCE_ID" not in env_names(consumer_container(default), default)


def test_keda_scales_on_lag_within_the_partition_count() -> None:
    """The ScaledObject targets the workload, measures the consumer's group on both topics, stops at the partitions."""
    docs = render_scenario("keda-values.yaml")
    values = scenario_values("keda-values.yaml")
    config = one(docs, "ConfigMap")["data"]
    scaled = one(docs, "ScaledObject")["spec"]
    target = workload(docs)
    assert "replicas" not in target["spec"], "the autoscaler owns the replica count"
    assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": target["kind"],
                                        "name": target["metadata"]["name"]}
    partitions = values["kafkaPartitions"]["spanTopic"] + values["kafkaPartitions"]["resultTopic"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    assert [t["metadata"]["topic"] for t in scaled["triggers"]] == [config["SPAN_TOPIC"], config["RESULT_TOPIC"]]
    for trigger in scaled["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == config["KAFKA_GROUP_ID"]
        assert meta["bootstrapServers"] == config["KAFKA_BOOTSTRAP_SERVERS"]
        assert (meta["allowIdleConsumers"], meta["sasl"], meta["tls"]) == ("false", "scram_sha512", "enable")
        assert meta["lagThreshold"] == str(values["autoscaling"]["keda"]["lagThreshold"])
    scale_down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in scale_down["policies"])


def test_keda_authenticates_as_the_consumer() -> None:
    """The TriggerAuthentication uses the consumer's SASL user and the Secret key that holds its password."""
    docs = render_scenario("keda-values.yaml")
    auth = one(docs, "TriggerAuthentication")
    assert {t["authenticationRef"]["name"] for t in one(docs, "ScaledObject")["spec"]["triggers"]} == {
        auth["metadata"]["name"]}
    (username,) = auth["spec"]["env"]
    assert username["parameter"] == "username"
    assert username["name"] in one(docs, "ConfigMap")["data"]
    assert username["containerName"] == consumer_container(docs)["name"]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    secret = one(docs, "Secret")
    assert refs["password"]["name"] == secret["metadata"]["name"]
    password = scenario_values("keda-values.yaml")["secrets"]["KAFKA_SASL_PASSWORD"]
    assert base64.b64decode(secret["data"][refs["password"]["key"]]).decode() == password
    assert refs["ca"] == {"parameter": "ca", "name": "kafka-cluster-ca", "key": "ca.crt"}


def test_keda_asks_for_at_most_the_partitions_of_both_topics() -> None:
    """One composite metric, the sum of both triggers' lag, per lagThreshold: each trigger capped at its partitions."""
    scaled = one(render_scenario("kafka-tls-values.yaml"), "ScaledObject")["spec"]
    modifiers = scaled["advanced"]["scalingModifiers"]
    names = [trigger["name"] for trigger in scaled["triggers"]]
    assert modifiers["formula"].replace(" ", "") == "+".join(names)
    assert modifiers["metricType"] == "AverageValue"
    assert {t["metadata"]["lagThreshold"] for t in scaled["triggers"]} == {modifiers["target"]}
    assert all(t["metadata"]["allowIdleConsumers"] == "false" for t in scaled["triggers"])
    assert scaled["maxReplicaCount"] == 6 + 3
    assert "cooldownPeriod" not in scaled and "idleReplicaCount" not in scaled, "KEDA uses them only at zero"
    assert scaled["minReplicaCount"] >= 1


def test_round_robin_gives_work_to_as_many_replicas_as_both_topics_have_partitions() -> None:
    """The consumer's assignor (aiokafka's default, round robin) deals both topics out together: 6+3 replicas work."""
    from aiokafka.consumer.consumer import AIOKafkaConsumer
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

    default = inspect.signature(AIOKafkaConsumer.__init__).parameters["partition_assignment_strategy"].default
    assert default == (RoundRobinPartitionAssignor,)
    assert "partition_assignment_strategy" not in (ROOT / "consumer" / "service.py").read_text()

    class Cluster:
        def partitions_for_topic(self, topic: str) -> set[int]:
            return set(range({"spans": 6, "results": 3}[topic]))

    for replicas in (4, 9, 12):
        members = {f"m{i:02}": ConsumerProtocolMemberMetadata(0, ["spans", "results"], b"") for i in range(replicas)}
        assignment = RoundRobinPartitionAssignor.assign(Cluster(), members)
        busy = [m for m, a in assignment.items() if any(partitions for _, partitions in a.assignment)]
        assert len(busy) == min(replicas, 6 + 3)


def test_tls_with_the_systems_cas_needs_no_trigger_authentication() -> None:
    """TLS without a CA Secret or credentials: `tls: enable` on the triggers, and no (empty) TriggerAuthentication."""
    docs = render_scenario("kafka-tls-values.yaml")
    assert not kinds(docs) & {"TriggerAuthentication", "ClusterTriggerAuthentication"}
    for trigger in one(docs, "ScaledObject")["spec"]["triggers"]:
        assert trigger["metadata"]["tls"] == "enable" and "sasl" not in trigger["metadata"]
        assert "authenticationRef" not in trigger
    with_ca = render_scenario("kafka-tls-values.yaml", "--set", "autoscaling.keda.caSecret.name=kafka-ca")
    auth = one(with_ca, "TriggerAuthentication")
    assert auth["spec"] == {"secretTargetRef": [{"parameter": "ca", "name": "kafka-ca", "key": "ca.crt"}]}


def test_cluster_trigger_authentication_reads_secrets_in_kedas_namespace() -> None:
    """A ClusterTriggerAuthentication is cluster-scoped, named after the namespace, and reads the named Secret."""
    docs = render_scenario("kafka-sasl-plain-values.yaml")
    auth = one(docs, "ClusterTriggerAuthentication")
    assert "TriggerAuthentication" not in kinds(docs)
    assert auth["metadata"]["name"] == f"{NAMESPACE}-{RELEASE}" and "namespace" not in auth["metadata"]
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "evaljoin-kafka-password",
                                                "key": "password"}]
    (username,) = auth["spec"]["env"]
    assert username["name"] == "KAFKA_SASL_USERNAME"
    for trigger in one(docs, "ScaledObject")["spec"]["triggers"]:
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"],
                                                "kind": "ClusterTriggerAuthentication"}
        assert trigger["metadata"]["sasl"] == "plaintext" and "tls" not in trigger["metadata"]
    message = helm_fails(*values_file("kafka-sasl-plain-values.yaml"), "--set", "autoscaling.keda.passwordSecret.name=")
    assert "name that Secret in autoscaling.keda.passwordSecret" in message


def test_keda_uses_an_existing_authentication_of_either_kind() -> None:
    """With authentication.name the triggers refer to that object, of the kind given, and the chart makes none."""
    docs = render_scenario("keda-values.yaml", "--set", "autoscaling.keda.authentication.name=kafka-auth",
                           "--set", "autoscaling.keda.authentication.kind=ClusterTriggerAuthentication")
    assert not kinds(docs) & {"TriggerAuthentication", "ClusterTriggerAuthentication"}
    refs = [t["authenticationRef"] for t in one(docs, "ScaledObject")["spec"]["triggers"]]
    assert refs == [{"name": "kafka-auth", "kind": "ClusterTriggerAuthentication"}] * 2


def _auth_spec(scenario: str, *more: str) -> dict[str, Any]:
    docs = render_scenario(scenario, *more)
    auth = one(docs, "TriggerAuthentication")
    refs = {t["authenticationRef"]["name"] for t in one(docs, "ScaledObject")["spec"]["triggers"]}
    assert refs == {auth["metadata"]["name"]}
    return dict(auth["spec"])


def test_keda_presents_the_consumers_client_certificate_for_mutual_tls() -> None:
    """mTLS: the lag scaler gets the CA, certificate and key from their Secrets, the key's password from the pod's."""
    spec = _auth_spec("kafka-mtls-values.yaml")
    refs = {r["parameter"]: (r["name"], r["key"]) for r in spec["secretTargetRef"]}
    assert refs == {"ca": ("kafka-cluster-ca", "ca.crt"), "cert": ("evaljoin-kafka-client", "tls.crt"),
                    "key": ("evaljoin-kafka-client", "tls.key"), "keyPassword": (RELEASE, "KAFKA_SSL_KEY_PASSWORD")}
    assert "env" not in spec
    message = helm_fails(*values_file("kafka-mtls-values.yaml"), "--set", "autoscaling.keda.clientCertSecret.name=")
    assert "name that Secret in autoscaling.keda.clientCertSecret" in message


def test_keda_fetches_oauthbearer_tokens_as_the_consumer_does() -> None:
    """OAUTHBEARER: client id, endpoint, scope and extensions from the container, the client secret from its Secret."""
    docs = render_scenario("kafka-oauthbearer-values.yaml")
    assert {t["metadata"]["sasl"] for t in one(docs, "ScaledObject")["spec"]["triggers"]} == {"oauthbearer"}
    spec = _auth_spec("kafka-oauthbearer-values.yaml")
    env = {e["parameter"]: e["name"] for e in spec["env"]}
    assert env == {"username": "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
                   "oauthTokenEndpointUri": "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                   "scopes": "KAFKA_SASL_OAUTHBEARER_SCOPE", "oauthExtensions": "KAFKA_SASL_OAUTHBEARER_EXTENSIONS"}
    assert set(env.values()) <= set(one(docs, "ConfigMap", RELEASE)["data"])
    (password,) = spec["secretTargetRef"]
    secret = one(docs, "Secret")
    assert (password["parameter"], password["name"]) == ("password", secret["metadata"]["name"])
    assert base64.b64decode(secret["data"][password["key"]]).decode() == "oidc-client-secret"


def test_keda_uses_msk_iam_through_an_identity_it_is_given() -> None:
    """AWS_MSK_IAM: the triggers ask for MSK IAM tokens in the brokers' region, signed with the named authentication."""
    docs = render_scenario("kafka-msk-iam-values.yaml")
    assert not kinds(docs) & {"TriggerAuthentication", "ClusterTriggerAuthentication"}
    for trigger in one(docs, "ScaledObject")["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert (meta["sasl"], meta["saslTokenProvider"], meta["awsRegion"]) == ("oauthbearer", "aws_msk_iam",
                                                                                "us-east-1")
        assert trigger["authenticationRef"]["name"] == "keda-aws-msk"
    message = helm_fails(*values_file("kafka-msk-iam-values.yaml"), "--set", "autoscaling.keda.authentication.name=")
    assert "autoscaling.keda.authentication.name" in message


def test_keda_fallback_holds_replicas_while_the_lag_is_unreadable() -> None:
    """fallback.replicas set: KEDA runs that many after failureThreshold failed checks; unset: no fallback."""
    scaled = one(render_scenario("kafka-tls-values.yaml"), "ScaledObject")["spec"]
    assert scaled["fallback"] == {"failureThreshold": 3, "replicas": 2, "behavior": "static"}
    assert "fallback" not in one(render_scenario("keda-values.yaml"), "ScaledObject")["spec"]
    message = helm_fails(*values_file("kafka-tls-values.yaml"), "--set", "autoscaling.keda.fallback.replicas=10")
    assert "autoscaling.keda.fallback.replicas=10 is outside" in message


def test_hpa_stays_within_the_partition_count() -> None:
    """The HPA targets the workload, stops at the partitions of both topics together and scales down slowly."""
    docs = render_scenario("hpa-values.yaml")
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == workload(docs)["metadata"]["name"]
    partitions = scenario_values("hpa-values.yaml")["kafkaPartitions"]
    assert hpa["minReplicas"] <= hpa["maxReplicas"] == partitions["spanTopic"] + partitions["resultTopic"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert "replicas" not in workload(docs)["spec"]


def test_disruption_budget_covers_the_consumers() -> None:
    """The PodDisruptionBudget selects the consumer pods and lets unhealthy ones be evicted."""
    docs = render_scenario("default")
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"] == workload(docs)["spec"]["selector"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# -- observability --------------------------------------------------------------------------------


def test_service_monitor_scrapes_the_metrics_port() -> None:
    """The ServiceMonitor selects the chart's Service and scrapes its `http` port at /metrics."""
    docs = render_scenario("servicemonitor-values.yaml")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_pod_monitor_scrapes_the_metrics_port_as_the_service_monitors_job() -> None:
    """The PodMonitor scrapes the consumer pods' `http` port at /metrics, naming the job as the ServiceMonitor does."""
    docs = render_scenario("monitoring-values.yaml")
    monitor = one(docs, "PodMonitor")["spec"]
    pod_labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["relabelings"][0] == {"action": "replace", "targetLabel": "job",
                                          "replacement": one(docs, "Service")["metadata"]["name"]}
    assert "choose one" in helm_fails(*values_file("monitoring-values.yaml"), "--set", "serviceMonitor.enabled=true")


ALERT_SERIES_FROM_KUBE_STATE_METRICS = {"kube_pod_container_status_last_terminated_exitcode",
                                        "kube_pod_container_status_restarts_total"}


def test_prometheus_rule_alerts_are_the_monitors_on_emitted_series() -> None:
    """The rule's alerts are the Datadog monitors', on series /metrics shows (kube-state-metrics' for the halt)."""
    from tests.test_dashboards import ALERTS, monitors, prometheus_series

    docs = render_scenario("monitoring-values.yaml")
    (group,) = one(docs, "PrometheusRule")["spec"]["groups"]
    rules = {rule["alert"]: rule for rule in group["rules"]}
    assert set(rules) == ALERTS
    tagged = {tag.removeprefix("alert:") for m in monitors().values() for tag in m["tags"] if tag.startswith("alert:")}
    assert tagged == ALERTS
    for name, rule in rules.items():
        series = set(re.findall(r"\b([a-z_]+)\{", rule["expr"]))
        assert series <= prometheus_series() | ALERT_SERIES_FROM_KUBE_STATE_METRICS, (name, series)
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert rule["labels"]["team"] == "llm-platform" and rule["labels"]["severity"], name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    selector = f'namespace="{NAMESPACE}",job="{one(docs, "Service")["metadata"]["name"]}"'
    assert selector in rules["EvaljoinDependencyRefused"]["expr"]
    out_of_memory = rules["EvaljoinRedisOutOfMemory"]
    assert f"evaljoin_redis_out_of_memory{{{selector}}}" in out_of_memory["expr"] and out_of_memory["for"] == "5m"
    assert "maxmemory" in out_of_memory["annotations"]["description"]
    assert "> 50000" in rules["EvaljoinLagGrowing"]["expr"] and "offset 15m" in rules["EvaljoinLagGrowing"]["expr"]
    halted = rules["EvaljoinHaltedByDlqLimit"]["expr"]
    assert "== 3" in halted and 'container="evaljoin"' in halted
    pods = re.search(r'pod=~"([^"]+)"', halted)
    assert pods
    for pod, ours in [("evaljoin-7d9f8c6b5-x2x9z", True), ("evaljoin-0", True), ("evaljoin-b-0", False),
                      ("evaljoin-b-7d9f8c6b5-x2x9z", False)]:
        assert bool(re.fullmatch(pods.group(1), pod)) == ours, pod
    fewer = render_scenario("monitoring-values.yaml", "--set", "prometheusRule.alerts.haltedByDlqLimit.enabled=false",
                            "--set", "prometheusRule.alerts.redisOutOfMemory.enabled=false")
    (left,) = one(fewer, "PrometheusRule")["spec"]["groups"]
    off = {"EvaljoinHaltedByDlqLimit", "EvaljoinRedisOutOfMemory"}
    assert {rule["alert"] for rule in left["rules"]} == ALERTS - off


def test_grafana_dashboard_configmap_is_the_repositorys_dashboard() -> None:
    """The sidecar ConfigMap carries grafana_dashboard: "1" and exactly deploy/dashboards/grafana.json."""
    dashboard = (ROOT / "deploy" / "dashboards" / "grafana.json").read_text()
    assert (CHART / "dashboards" / "grafana.json").read_text() == dashboard, "the chart's copy differs"
    docs = render_scenario("monitoring-values.yaml")
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "LLM Observability"}
    (content,) = configmap["data"].values()
    assert json.loads(content) == json.loads(dashboard)


def test_datadog_agent_scrapes_the_same_endpoint() -> None:
    """Autodiscovery annotations name the container and point the OpenMetrics check at HEALTH_PORT/metrics."""
    docs = render_scenario("default")
    template = workload(docs)["spec"]["template"]
    name = consumer_container(docs)["name"]
    checks = json.loads(template["metadata"]["annotations"][f"ad.datadoghq.com/{name}.checks"])
    (instance,) = checks["openmetrics"]["instances"]
    assert instance["openmetrics_endpoint"] == "http://%%host%%:8080/metrics"
    assert instance["raw_metric_prefix"] == "evaljoin_"
    logs = json.loads(template["metadata"]["annotations"][f"ad.datadoghq.com/{name}.logs"])
    assert logs[0]["service"] == template["metadata"]["labels"]["tags.datadoghq.com/service"]
    off = workload(render_scenario("servicemonitor-values.yaml"))["spec"]["template"]["metadata"]
    assert not any(k.startswith("ad.datadoghq.com/") for k in off.get("annotations", {}))


def test_unified_service_tags_label_the_workload_and_its_pods() -> None:
    """Workload and pods carry tags.datadoghq.com/env, service and version (env only when set)."""
    docs = render_scenario("agentless-values.yaml")
    for labels in (workload(docs)["metadata"]["labels"], workload(docs)["spec"]["template"]["metadata"]["labels"]):
        assert labels["tags.datadoghq.com/env"] == "prod"
        assert labels["tags.datadoghq.com/service"] == "evaljoin"
        assert labels["tags.datadoghq.com/version"] == "0.1.0"
    assert "tags.datadoghq.com/env" not in workload(render_scenario("default"))["metadata"]["labels"]


@pytest.mark.parametrize(("scenario", "from_node"), [
    ("default", True), ("agentless-values.yaml", False), ("servicemonitor-values.yaml", False)])
def test_agent_is_the_nodes_unless_agentless_or_named(scenario: str, from_node: bool) -> None:
    """DD_AGENT_HOST is the node's IP when delivery goes through an Agent that config does not name."""
    env = {e["name"]: e for e in consumer_container(render_scenario(scenario)).get("env", [])}
    if from_node:
        assert env["DD_AGENT_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    else:
        assert "DD_AGENT_HOST" not in env


# -- security -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_is_locked_down(scenario: str) -> None:
    """Non-root, read-only root filesystem, no capabilities, RuntimeDefault seccomp, no API token."""
    for spec in pod_specs(render_scenario(scenario)):
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["runAsUser"] >= 10000


def test_default_requests_are_the_measured_figures() -> None:
    """Requests are set by default, limits are not, and values.yaml names the measured figures they come from."""
    resources = consumer_container(render_scenario("default"))["resources"]
    assert set(resources) == {"requests"} and set(resources["requests"]) == {"cpu", "memory"}
    values = (CHART / "values.yaml").read_text()
    comment = values[values.index("# -- Container resources."):values.index("\nresources:")]
    performance = (ROOT / "docs" / "performance.md").read_text()
    for figure in ("112", "82.9", "1,690"):
        assert figure in comment and figure in performance, figure
    assert re.search(r"service CPU ms per 1,000 evaluations\s+112\b", performance)
    assert "max 82.9" in performance


def test_network_policy_allows_only_dns_kafka_redis_and_datadog() -> None:
    """Egress goes only to DNS and the ports of Kafka, Redis and the Agent; ingress only to the health port."""
    docs = render_scenario("networkpolicy-values.yaml")
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    ports = [sorted((p["port"], p["protocol"]) for p in rule["ports"]) for rule in policy["egress"]]
    assert ports == [[(53, "TCP"), (53, "UDP")], [(9092, "TCP")], [(6380, "TCP")], [(8126, "TCP")]]
    assert all(rule.get("to") for rule in policy["egress"]), "every peer is narrowed in this scenario"
    selected = {e["key"]: e["values"] for e in policy["podSelector"]["matchExpressions"]}
    assert selected == {"app.kubernetes.io/instance": [RELEASE],
                        "app.kubernetes.io/name": ["evaljoin", "evaljoin-check"]}
    agentless = one(render_scenario("agentless-values.yaml"), "NetworkPolicy")["spec"]["egress"]
    assert agentless[-1]["ports"] == [{"port": 443, "protocol": "TCP"}]


def _egress_ports(docs: list[dict[str, Any]]) -> list[list[tuple[Any, str]]]:
    policy = one(docs, "NetworkPolicy")["spec"]
    return [sorted((p["port"], p["protocol"]) for p in rule["ports"]) for rule in policy["egress"]]


def test_network_policy_allows_what_the_chart_turns_on() -> None:
    """Agentless with self-tracing reaches the intake and the Agent; over the Agent's socket, no Agent port."""
    traced = render_scenario("agentless-values.yaml", "--set", "config.DD_TRACE_ENABLED=true")
    assert _egress_ports(traced)[-2:] == [[(443, "TCP")], [(8126, "TCP")]]
    url = render_scenario("agentless-values.yaml", "--set", "config.DD_TRACE_ENABLED=true",
                          "--set", "config.DD_TRACE_AGENT_URL=http://datadog-agent.datadog:8127")
    assert _egress_ports(url)[-1] == [(8127, "TCP")]
    socket = render_scenario("kafka-tls-values.yaml", "--set", "config.DD_TRACE_ENABLED=true")
    assert one(socket, "ConfigMap")["data"]["DD_TRACE_AGENT_URL"].startswith("unix://")
    assert _egress_ports(socket) == [[(53, "TCP"), (53, "UDP")], [(9093, "TCP")], [(6380, "TCP")]]


def test_network_policy_lets_the_consumer_fetch_its_kafka_tokens() -> None:
    """OAUTHBEARER reaches its token endpoint's port, AWS_MSK_IAM reaches STS over HTTPS; other mechanisms neither."""
    oauth = render_scenario("kafka-oauthbearer-values.yaml", "--set", "networkPolicy.enabled=true",
                            "--set", "config.KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL=https://login.example.com:8443/t")
    assert [(8443, "TCP")] in _egress_ports(oauth)
    msk = render_scenario("kafka-msk-iam-values.yaml", "--set", "networkPolicy.enabled=true",
                          "--set", "networkPolicy.kafkaAuth.to[0].ipBlock.cidr=0.0.0.0/0")
    policy = one(msk, "NetworkPolicy")["spec"]["egress"]
    assert {"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]} in policy
    plain = render_scenario("keda-values.yaml", "--set", "networkPolicy.enabled=true")
    assert len(_egress_ports(plain)) == 4, "DNS, Kafka, Redis, the Agent"


def test_network_policy_lets_the_datadog_agent_scrape_when_autodiscovery_is_on() -> None:
    """With metricsFrom narrowed and autodiscovery on, the Datadog Agent's pods may reach the metrics port too."""
    docs = render_scenario("monitoring-values.yaml")
    (ingress,) = one(docs, "NetworkPolicy")["spec"]["ingress"]
    values = scenario_values("monitoring-values.yaml")["networkPolicy"]
    assert ingress["from"] == values["metricsFrom"] + values["datadogAgentFrom"]
    assert ingress["from"][-1]["podSelector"]["matchLabels"] == {"agent.datadoghq.com/component": "agent"}
    off = render_scenario("monitoring-values.yaml", "--set", "datadog.autodiscovery.enabled=false")
    assert one(off, "NetworkPolicy")["spec"]["ingress"][0]["from"] == values["metricsFrom"]


def test_agent_socket_is_mounted_read_only_from_the_node() -> None:
    """datadog.agentSocket mounts the Agent's socket directory (hostPath) read-only and points the service at it."""
    docs = render_scenario("kafka-tls-values.yaml")
    spec = workload(docs)["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert volume["hostPath"] == {"path": "/var/run/datadog", "type": "DirectoryOrCreate"}
    mount = next(m for m in consumer_container(docs)["volumeMounts"] if m["name"] == volume["name"])
    assert (mount["mountPath"], mount["readOnly"]) == ("/var/run/datadog", True)
    assert one(docs, "ConfigMap")["data"]["DD_TRACE_AGENT_URL"] == "unix:///var/run/datadog/apm.socket"
    assert "DD_AGENT_HOST" not in {e["name"] for e in consumer_container(docs).get("env", [])}
    named = render_scenario("kafka-tls-values.yaml", "--set", "config.DD_TRACE_AGENT_URL=unix:///run/dd/apm.sock")
    assert one(named, "ConfigMap")["data"]["DD_TRACE_AGENT_URL"] == "unix:///run/dd/apm.sock"
    assert not any("hostPath" in v for v in workload(render_scenario("default"))["spec"]["template"]["spec"]["volumes"])


# -- the README's install line and the notes ----------------------------------------------------------


def _readme_commands() -> list[list[str]]:
    readme = (CHART / "README.md").read_text()
    block = re.search(r"## Install\n.*?```sh\n(.*?)```", readme, flags=re.DOTALL)
    assert block, "the README has no install block"
    return [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_install_line_renders_valid_manifests(tmp_path: Path) -> None:
    """The README's `helm install` renders valid objects that mount the Secret its kubectl line makes."""
    commands = _readme_commands()
    (install,) = [c for c in commands if c[:2] == ["helm", "install"]]
    (create,) = [c for c in commands if c[:2] == ["kubectl", "--namespace"] and "secret" in c]
    release, chart, *args = install[2:]
    assert (ROOT / chart).resolve() == CHART
    done = run(tool(HELM), "template", release, chart, *args)
    assert done.returncode == 0, done.stderr
    rendered = tmp_path / "install.yaml"
    rendered.write_text(done.stdout)
    validated = run(tool(TOOLS / "kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSION,
                    rendered)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    docs = yaml_documents(done.stdout)
    literal_keys = {arg.split("=", 2)[1] for arg in create if arg.startswith("--from-literal=")}
    secret_name = create[create.index("generic") + 1]
    volume = secrets_volume(docs)
    assert volume is not None
    assert volume["secret"]["secretName"] == secret_name
    assert {item["key"] for item in volume["secret"]["items"]} <= literal_keys
    assert "127.0.0.1" not in one(docs, "ConfigMap")["data"]["KAFKA_BOOTSTRAP_SERVERS"]


def _notes(tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it: rendered, in a copy of the chart, into a ConfigMap to read it."""
    copy_ = tmp_path / "evaljoin"
    shutil.copytree(CHART, copy_)
    notes = (copy_ / "templates" / "NOTES.txt").read_text()
    (copy_ / "templates" / "_notes_for_test.tpl").write_text(f'{{{{- define "notes-for-test" }}}}{notes}{{{{- end }}}}')
    (copy_ / "templates" / "notes-for-test.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n'
        'data:\n  notes: {{ include "notes-for-test" . | quote }}\n')
    done = helm_template("--show-only", "templates/notes-for-test.yaml", *args, chart=copy_)
    assert done.returncode == 0, done.stderr
    return str(yaml_documents(done.stdout)[0]["data"]["notes"])


def test_notes_warn_about_loopback_endpoints_and_say_what_to_check(tmp_path: Path) -> None:
    """The notes warn when Kafka or Redis is the pod itself, and tell how to check readiness and delivery."""
    notes = _notes(tmp_path)
    assert "WARNING: config.KAFKA_BOOTSTRAP_SERVERS is 127.0.0.1:9092" in notes
    assert "WARNING: no secrets.REDIS_URL" in notes
    assert "helm test evaljoin --namespace llmobs" in notes
    assert "/readyz" in notes and "rollout status deployment/evaljoin" in notes
    assert "through the Datadog Agent on each pod's node" in notes
    clean = _notes(tmp_path / "keda", *values_file("keda-values.yaml"))
    assert "WARNING" not in clean
    assert "kubectl --namespace llmobs get scaledobject evaljoin" in clean


def test_notes_warn_when_replicas_exceed_partitions(tmp_path: Path) -> None:
    """The notes say how many replicas would sit idle: those beyond the partitions of both topics together."""
    partitions = ["--set", "kafkaPartitions.spanTopic=3", "--set", "kafkaPartitions.resultTopic=2"]
    notes = _notes(tmp_path / "over", "--set", "replicaCount=7", *partitions)
    assert "replicaCount=7 is above the 5 partitions of both topics" in notes
    assert "2 replicas will hold no partition" in notes
    assert "WARNING: replicaCount" not in _notes(tmp_path / "within", "--set", "replicaCount=5", *partitions)


# -- the chart's own documentation ------------------------------------------------------------------


def _documented_values() -> dict[str, str]:
    """Keys of values.yaml with a `# --` comment, by dotted path."""
    documented: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = True
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
        if stripped.startswith(("#", "-")) or not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if pending:
            documented[".".join(key for _, key in stack)] = line
            pending = False
    return documented


def _leaves(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_readme_values_table_matches_values_yaml() -> None:
    """The README's values table lists every documented value with its default, and every value is documented."""
    values = scenario_values("default")
    documented = _documented_values()
    for leaf in _leaves(values):
        assert any(leaf == key or leaf.startswith(key + ".") for key in documented), f"{leaf} is undocumented"
    rows = re.findall(r"^\| `([^`]+)` \| [^|]+ \| `(.*)` \| .* \|$", (CHART / "README.md").read_text(),
                      flags=re.MULTILINE)
    assert [key for key, _ in rows] == list(documented)
    for key, default in rows:
        expected: Any = values
        for part in key.split("."):
            expected = expected[part]
        assert json.loads(default) == expected, key


def test_values_schema_covers_every_value() -> None:
    """The values schema describes every top-level value and refuses others."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert set(scenario_values("default")) <= set(schema["properties"])


def test_app_version_is_the_services_version() -> None:
    """The chart's appVersion is the service's version, the default image tag."""
    chart = yaml_documents((CHART / "Chart.yaml").read_text())[0]
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "(.+)"$', pyproject, flags=re.MULTILINE)
    assert version and chart["appVersion"] == version.group(1)
    image = consumer_container(render_scenario("default"))["image"]
    assert image.endswith(f":{chart['appVersion']}")
    digest = "sha256:" + "a" * 64
    pinned = consumer_container(render("--set", f"image.digest={digest}"))["image"]
    assert pinned == f"evaljoin@{digest}"


def test_helm_renders_for_the_kubernetes_version_the_manifests_are_validated_against(tmp_path: Path) -> None:
    """The helm the tests use is a release build: it knows its version and renders for Kubernetes 1.37."""
    done = run(tool(HELM), "version", "--template", "{{.Version}}")
    assert done.returncode == 0 and re.fullmatch(r"v3\.\d+\.\d+", done.stdout), done.stdout
    probe = tmp_path / "capabilities"
    (probe / "templates").mkdir(parents=True)
    (probe / "Chart.yaml").write_text("apiVersion: v2\nname: capabilities\nversion: 0.1.0\n")
    (probe / "templates" / "kube.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kube\n"
        "data:\n  version: {{ .Capabilities.KubeVersion.Version | quote }}\n")
    rendered = helm_template(chart=probe)
    assert rendered.returncode == 0, rendered.stderr
    assert yaml_documents(rendered.stdout)[0]["data"]["version"] == f"v{KUBERNETES_VERSION}"
