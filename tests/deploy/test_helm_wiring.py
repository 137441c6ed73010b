"""The Helm chart's wiring, checked against the code it deploys.

The chart is rendered with helm under every values file of the CI matrix (deploy/helm/crm/ci/), then:
- every environment variable a container gets is a setting its component reads (names derived from
  the component's pydantic-settings class: `model_fields` + `env_prefix`, nested settings through
  their own prefix), and the rendered values pass that class's validation;
- the gateway's (and the services') upstream targets name rendered Services on their gRPC ports;
- every service has a pre-install/pre-upgrade migration Job whose command is the component's
  console script, and that command really migrates a database;
- the shape the platform team relies on: probes, security context, resources, autoscaling,
  disruption budgets, network policies.

A component whose Python package does not exist yet is only checked for rendering; the test says so
and covers it automatically once the package lands. helm comes from `make helm-lint`; with CI=true a
missing helm fails the test instead of skipping it.
"""

import functools
import importlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "crm"
MATRIX = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "crm-test"
RELEASE = "crm"
# Read by the OpenTelemetry SDK itself (crm_platform.telemetry), not by a settings class.
OTEL_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}
# Read by asyncpg itself, as libpq does: the CA that verifies PostgreSQL servers (`database.tls`).
LIBPQ_VARIABLES = {"PGSSLROOTCERT", "PGSSLMODE"}
# Stand-ins for values the chart takes from Secrets, so the settings classes can validate the rest.
SECRET_STAND_INS = {"DATABASE_URL": "postgresql://crm:secret@postgres:5432/crm", "SASL_USERNAME": "crm"}


@dataclass(frozen=True)
class Component:
    name: str  # Kubernetes name and console script suffix: crm-<name>
    package: str  # Python package under services/<name>/src/
    values_key: str

    @property
    def env_prefix(self) -> str:
        return f"CRM_{self.name.upper().replace('-', '_')}_"

    @property
    def grpc(self) -> bool:
        return self.name != "gateway"


COMPONENTS = [
    Component("gateway", "gateway", "gateway"),
    Component("leads", "leads", "leads"),
    Component("accounts", "accounts", "accounts"),
    Component("sales", "sales", "sales"),
    Component("service-desk", "service_desk", "serviceDesk"),
    Component("analytics", "analytics", "analytics"),
]
SERVICES = [c for c in COMPONENTS if c.grpc]


# --- rendering ---------------------------------------------------------------------------------


def helm_binary() -> str:
    for candidate in (os.environ.get("HELM"), str(REPO / ".tools" / "helm" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    message = "helm is not installed: `make helm-lint` installs it into .tools/helm/helm"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message + " (with CI=true this is a failure)")


@dataclass
class Rendering:
    values_file: str
    values: dict[str, Any]
    documents: list[dict[str, Any]]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        for doc in self.documents:
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
        return None

    def get(self, kind: str, name: str) -> dict[str, Any]:
        doc = self.find(kind, name)
        assert doc is not None, f"{self.values_file}: no {kind} {name} rendered"
        return doc

    def component_values(self, component: Component) -> dict[str, Any]:
        defaults: dict[str, Any] = chart_defaults()[component.values_key]
        return deep_merge(defaults, self.values.get(component.values_key, {}))


@functools.cache
def chart_defaults() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def render(values_file: Path) -> Rendering:
    result = subprocess.run(
        [helm_binary(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(values_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"helm template -f {values_file.name} failed:\n{result.stderr}"
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    values = yaml.safe_load(values_file.read_text()) or {}
    return Rendering(values_file.name, values, documents)


@pytest.fixture(scope="module")
def renderings() -> list[Rendering]:
    assert MATRIX, f"no values files in {CHART / 'ci'}"
    return [render(path) for path in MATRIX]


def fullname(component: Component) -> str:
    return f"{RELEASE}-{component.name}"


def containers(pod_owner: dict[str, Any]) -> list[dict[str, Any]]:
    spec: list[dict[str, Any]] = pod_owner["spec"]["template"]["spec"]["containers"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env", [])}


# --- the code's side ---------------------------------------------------------------------------


def settings_class(component: Component) -> type[BaseSettings] | None:
    """The component's settings class, or None while its package does not exist."""
    src = REPO / "services" / component.name / "src"
    if not (src / component.package / "config.py").is_file():
        return None
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    module = importlib.import_module(f"{component.package}.config")
    classes = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseSettings)
        and value.__module__ == module.__name__
        and value.model_config.get("env_prefix") == component.env_prefix
    ]
    assert len(classes) == 1, f"{module.__name__}: expected one settings class with prefix {component.env_prefix}"
    return classes[0]


def readable_variables(settings: type[BaseSettings]) -> set[str]:
    """Environment variables a settings class reads: its fields under its prefix, nested settings
    under their own prefix (they read the environment themselves)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for field_name, field in settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            names |= readable_variables(annotation)
        else:
            names.add(f"{prefix}{field.alias or field_name}".upper())
    return names


def component_id(component: Component) -> str:
    return component.name


def require_package(component: Component, renderings: list[Rendering]) -> type[BaseSettings]:
    """The settings class; for a component without a package yet, check it renders and say so."""
    settings = settings_class(component)
    if settings is None:
        for rendering in renderings:
            rendering.get("Deployment", fullname(component))
        pytest.skip(
            f"services/{component.name}/src/{component.package} does not exist yet: "
            f"only checked that the chart renders {component.name} under every values file"
        )
    return settings


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in list(os.environ):
        if name.startswith(("CRM_", "OTEL_")):
            monkeypatch.delenv(name)
    yield monkeypatch


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS, ids=component_id)
def test_env_vars_are_settings_the_component_reads(component: Component, renderings: list[Rendering]) -> None:
    settings = require_package(component, renderings)
    readable = readable_variables(settings) | OTEL_VARIABLES | LIBPQ_VARIABLES
    for rendering in renderings:
        workloads = [rendering.get("Deployment", fullname(component))]
        job = rendering.find("Job", f"{fullname(component)}-migrate")
        workloads += [job] if job else []
        for workload in workloads:
            for container in containers(workload):
                unknown = set(env_of(container)) - readable
                assert not unknown, (
                    f"{rendering.values_file}: {workload['kind']} {workload['metadata']['name']} sets "
                    f"{sorted(unknown)}, which {settings.__module__}.{settings.__name__} does not read"
                )


@pytest.mark.parametrize("component", COMPONENTS, ids=component_id)
def test_rendered_settings_validate(
    component: Component, renderings: list[Rendering], clean_environment: pytest.MonkeyPatch
) -> None:
    """The values the chart renders parse: types, enums, JSON lists, cross-field rules."""
    settings = require_package(component, renderings)
    for rendering in renderings:
        container = containers(rendering.get("Deployment", fullname(component)))[0]
        for name, var in env_of(container).items():
            if "value" in var:
                clean_environment.setenv(name, var["value"])
            else:
                stand_in = next((v for suffix, v in SECRET_STAND_INS.items() if name.endswith(suffix)), "secret")
                clean_environment.setenv(name, stand_in)
        loaded = settings()
        if component.grpc:
            assert loaded.model_dump()["grpc_host"] == "0.0.0.0", "a pod must listen on every interface"
        else:
            assert loaded.model_dump()["dev_mode"] is False
        for name in list(env_of(container)):
            clean_environment.delenv(name)


def target_of(rendering: Rendering, value: str) -> dict[str, Any]:
    """The rendered Service a `host:port` target reaches, checked down to the serving container."""
    host, _, port = value.rpartition(":")
    service_name, namespace, *rest = host.split(".")
    assert namespace == NAMESPACE and rest == ["svc"], f"{value}: not a Service of the release's namespace"
    service = rendering.get("Service", service_name)
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert int(port) in ports, f"{value}: Service {service_name} has no port {port}"
    service_port = ports[int(port)]
    assert service_port["name"] == "grpc" and service_port["targetPort"] == "grpc", f"{value}: not a gRPC port"
    deployment = rendering.get("Deployment", service_name)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items(), f"{service_name} selects no pods"
    return deployment


@pytest.mark.parametrize("component", COMPONENTS, ids=component_id)
def test_upstream_targets_point_at_rendered_services(
    component: Component, renderings: list[Rendering], clean_environment: pytest.MonkeyPatch
) -> None:
    settings = require_package(component, renderings)
    for rendering in renderings:
        env = env_of(containers(rendering.get("Deployment", fullname(component)))[0])
        targets = {name: var["value"] for name, var in env.items() if name.endswith("_TARGET")}
        # Every upstream the component can call is wired (its defaults point at 127.0.0.1).
        wanted = {name for name in readable_variables(settings) if name.endswith("_TARGET")}
        missing = wanted - set(targets)
        assert not missing, f"{rendering.values_file}: {component.name}'s {sorted(missing)} are not wired"
        for name, value in targets.items():
            upstream = name.removeprefix(component.env_prefix).removesuffix("_TARGET").lower().replace("_", "-")
            assert value.startswith(f"{RELEASE}-{upstream}."), f"{name}={value} does not name the {upstream} Service"
            deployment = target_of(rendering, value)
            upstream_container = containers(deployment)[0]
            grpc_port = next(p["containerPort"] for p in upstream_container["ports"] if p["name"] == "grpc")
            listen = env_of(upstream_container)[f"CRM_{upstream.upper().replace('-', '_')}_GRPC_PORT"]["value"]
            assert int(listen) == grpc_port == int(value.rpartition(":")[2]), f"{name}: port mismatch"


def test_every_service_has_its_migration_hook(renderings: list[Rendering]) -> None:
    for rendering in renderings:
        for component in COMPONENTS:
            job = rendering.find("Job", f"{fullname(component)}-migrate")
            if not rendering.component_values(component)["migrations"]["enabled"]:
                assert job is None
                continue
            assert job is not None, f"{rendering.values_file}: {component.name} has no migration Job"
            annotations = job["metadata"]["annotations"]
            assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
            (container,) = containers(job)
            if component.grpc:
                assert container["command"] == [f"crm-{component.name}", "migrate"]
            deployment = containers(rendering.get("Deployment", fullname(component)))[0]
            url = f"{component.env_prefix}DATABASE_URL"
            assert env_of(container)[url] == env_of(deployment)[url], "the Job must migrate the database the pods use"
        for component in COMPONENTS:
            # Pods migrate at start only when there is no Job to do it.
            enabled = rendering.component_values(component)["migrations"]["enabled"]
            env = env_of(containers(rendering.get("Deployment", fullname(component)))[0])
            assert env[f"{component.env_prefix}MIGRATE_ON_START"]["value"] == str(not enabled).lower()
        for service in SERVICES:
            assert rendering.find("Job", f"{fullname(service)}-migrate"), f"{service.name}: no migration hook"


def test_migration_jobs_run_on_the_components_nodes_as_a_service_account_that_exists(
    renderings: list[Rendering],
) -> None:
    """A migration Job lands where its component's pods may (node selector, tolerations, node
    affinity; not the replicas' pod anti-affinity or spread), with their pod annotations, and runs as
    a ServiceAccount that exists when the pre-install hook runs: the operator's own
    (`serviceAccount.create: false`) or a hook ServiceAccount made before the Job with the
    component's ServiceAccount annotations, never the component's ordinary one (made after the hooks)."""
    for rendering in renderings:
        for component in COMPONENTS:
            job = rendering.find("Job", f"{fullname(component)}-migrate")
            if job is None:
                continue
            where = f"{rendering.values_file}: Job {job['metadata']['name']}"
            values = rendering.component_values(component)
            pod = job["spec"]["template"]["spec"]
            assert pod.get("nodeSelector", {}) == values["nodeSelector"], where
            assert pod.get("tolerations", []) == values["tolerations"], where
            node_affinity = values["affinity"].get("nodeAffinity")
            assert pod.get("affinity", {}) == ({"nodeAffinity": node_affinity} if node_affinity else {}), where
            assert "topologySpreadConstraints" not in pod, where
            assert job["spec"]["template"]["metadata"].get("annotations", {}) == values["podAnnotations"], where
            account_name = pod["serviceAccountName"]
            pods_account = rendering.get("Deployment", fullname(component))["spec"]["template"]["spec"][
                "serviceAccountName"
            ]
            account = rendering.find("ServiceAccount", account_name)
            if not values["serviceAccount"]["create"]:
                assert account is None, f"{where}: {account_name} is the operator's, the chart must not make it"
                assert account_name == (values["serviceAccount"]["name"] or "default") == pods_account, where
                continue
            assert account is not None, f"{where}: runs as {account_name}, which the chart does not make"
            assert account_name != pods_account, (
                f"{where}: the component's own ServiceAccount does not exist yet when a pre-install hook runs"
            )
            hook, job_hook = account["metadata"]["annotations"], job["metadata"]["annotations"]
            assert hook["helm.sh/hook"] == job_hook["helm.sh/hook"], where
            assert int(hook["helm.sh/hook-weight"]) < int(job_hook["helm.sh/hook-weight"]), f"{where}: made after"
            assert "before-hook-creation" in hook["helm.sh/hook-delete-policy"].split(","), where
            assert values["serviceAccount"]["annotations"].items() <= hook.items(), f"{where}: identity lost"
            assert account["automountServiceAccountToken"] is False, where
    # The matrix exercises each case (ci/node-pool-values.yaml, ci/external-secrets-values.yaml).
    node_pool = next(r for r in renderings if r.values_file == "node-pool-values.yaml")
    leads = node_pool.get("Job", f"{RELEASE}-leads-migrate")["spec"]["template"]
    assert leads["spec"]["nodeSelector"] == {"kubernetes.io/arch": "arm64"} and leads["spec"]["tolerations"]
    assert set(leads["spec"]["affinity"]) == {"nodeAffinity"}
    assert leads["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    identity = node_pool.get("ServiceAccount", leads["spec"]["serviceAccountName"])["metadata"]["annotations"]
    assert "iam.gke.io/gcp-service-account" in identity
    sales = node_pool.get("Job", f"{RELEASE}-sales-migrate")["spec"]["template"]["spec"]
    assert sales["serviceAccountName"] == "crm-sales-workload"


def executable(component: Component, name: str) -> str:
    """A Job's executable resolved in this environment; console scripts must be declared by the
    component's pyproject (the image installs them from there)."""
    if name.startswith("crm-"):
        pyproject = REPO / "services" / component.name / "pyproject.toml"
        scripts = tomllib.loads(pyproject.read_text()).get("project", {}).get("scripts", {})
        assert name in scripts, f"{pyproject}: no console script {name}"
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed in {Path(sys.executable).parent}: run `make setup`"
    return found


@pytest.mark.parametrize("component", COMPONENTS, ids=component_id)
def test_migration_job_command_migrates(component: Component, renderings: list[Rendering], tmp_path: Path) -> None:
    """The rendered Job's command, run as is, upgrades a database to head and exits."""
    if settings_class(component) is None:
        pytest.skip(f"services/{component.name}/src/{component.package} does not exist yet")
    jobs = [job for r in renderings if (job := r.find("Job", f"{fullname(component)}-migrate"))]
    assert jobs, f"no values file of the matrix renders the {component.name} migration Job"
    (container,) = containers(jobs[0])
    command = [executable(component, container["command"][0]), *container["command"][1:]]
    database = tmp_path / "migrate.db"
    env = {name: value for name, value in os.environ.items() if not name.startswith("CRM_")}
    env |= {
        f"{component.env_prefix}DATABASE_URL": f"sqlite:///{database}",
        # Should the command not be a migration, it must not take a port another process uses.
        f"{component.env_prefix}PORT": "0",
        f"{component.env_prefix}GRPC_PORT": "0",
        f"{component.env_prefix}METRICS_PORT": "0",
        "CRM_DATA_DIR": str(tmp_path),
    }
    shown = " ".join(container["command"])
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{shown}` did not exit within 30 s: the chart's migration Job would hang")
    assert result.returncode == 0, f"`{shown}` failed:\n{result.stderr[-2000:]}"
    with sqlite3.connect(database) as connection:
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    assert versions, f"`{shown}` left no alembic revision"


def test_gateway_policy_configmap_is_the_gateways_default_policy(renderings: list[Rendering]) -> None:
    default_policy = REPO / "services" / "gateway" / "src" / "gateway" / "security" / "default_policy.yaml"
    for rendering in renderings:
        existing = rendering.component_values(COMPONENTS[0])["policy"]["existingConfigMap"]
        configmap = rendering.find("ConfigMap", f"{RELEASE}-gateway-policy")
        volume = next(
            v
            for v in rendering.get("Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["volumes"]
            if v["name"] == "policy"
        )
        if existing:
            assert configmap is None and volume["configMap"]["name"] == existing
            continue
        assert configmap is not None and volume["configMap"]["name"] == configmap["metadata"]["name"]
        assert configmap["data"]["policy.yaml"].strip() == default_policy.read_text().strip()
        env = env_of(containers(rendering.get("Deployment", f"{RELEASE}-gateway"))[0])
        assert env["CRM_GATEWAY_POLICY_PATH"]["value"] == "/etc/crm/policy/policy.yaml"


def test_the_gateway_trusts_forwarded_client_addresses_only_from_the_configured_proxies(
    renderings: list[Rendering],
) -> None:
    for rendering in renderings:
        trusted = rendering.component_values(COMPONENTS[0]).get("trustedProxies", "")
        env = env_of(containers(rendering.get("Deployment", f"{RELEASE}-gateway"))[0])
        if trusted:
            assert env["CRM_GATEWAY_FORWARDED_ALLOW_IPS"]["value"] == trusted, rendering.values_file
        else:  # the gateway's default: none but itself
            assert "CRM_GATEWAY_FORWARDED_ALLOW_IPS" not in env, rendering.values_file
    assert any(r.component_values(COMPONENTS[0]).get("trustedProxies") for r in renderings)


def test_workload_shape(renderings: list[Rendering]) -> None:
    """Probes, security context, resources, /tmp, and the per-component scaling objects."""
    for rendering in renderings:
        network_policies = rendering.values.get("networkPolicy", {}).get("enabled", True)
        for component in COMPONENTS:
            name = fullname(component)
            values = rendering.component_values(component)
            deployment = rendering.get("Deployment", name)
            pod = deployment["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == ["ALL"]
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
            assert container["resources"] == values["resources"]
            port_name = "grpc" if component.grpc else "http"
            service = rendering.get("Service", name)
            assert [p["name"] for p in service["spec"]["ports"]] == [port_name]
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if component.grpc:
                    assert container[probe]["grpc"]["port"] == values["grpcPort"], f"{name}: {probe}"
                else:
                    assert container[probe]["httpGet"]["port"] == "http", f"{name}: {probe}"
            hpa = rendering.find("HorizontalPodAutoscaler", name)
            if values["autoscaling"]["enabled"]:
                assert hpa is not None and "replicas" not in deployment["spec"]
                assert hpa["spec"]["minReplicas"] == values["autoscaling"]["minReplicas"]
                assert hpa["spec"]["maxReplicas"] == values["autoscaling"]["maxReplicas"]
                cpu = hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"]
                assert cpu == values["autoscaling"]["targetCPU"]
            else:
                assert hpa is None and deployment["spec"]["replicas"] == values["replicaCount"]
            assert (rendering.find("PodDisruptionBudget", name) is not None) == values["pdb"]["create"]
            policy = rendering.find("NetworkPolicy", name)
            assert (policy is not None) == network_policies
            if policy and component.grpc:
                (rule, *_) = policy["spec"]["ingress"]
                allowed = rule["from"][0]["podSelector"]["matchExpressions"][0]["values"]
                callers = [c.name for c in SERVICES if component.name in rendering.component_values(c)["upstreams"]]
                assert sorted(allowed) == sorted(["gateway", *callers]), (
                    f"{name}: only from the gateway and its callers"
                )
            if policy and not component.grpc:
                gateway_from = rendering.values.get("networkPolicy", {}).get("gatewayFrom", [])
                assert policy["spec"]["ingress"][0].get("from", []) == gateway_from


def grpc_service_name(component: Component) -> str:
    """The gRPC service the component's server reports the readiness of (`ServiceApp.service_names`)."""
    src = REPO / "services" / component.name / "src"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    name: str = importlib.import_module(f"{component.package}.__main__").SERVICE_NAME
    return name


def test_readiness_asks_the_services_own_grpc_service_and_liveness_the_server(renderings: list[Rendering]) -> None:
    """A service's own gRPC service is NOT_SERVING while its database does not answer: readiness asks
    it, so the pod leaves the endpoints; liveness and startup ask the server (""), which stays
    SERVING, so a database outage restarts no pod."""
    for rendering in renderings:
        for component in SERVICES:
            (container,) = rendering.get("Deployment", fullname(component))["spec"]["template"]["spec"]["containers"]
            assert container["readinessProbe"]["grpc"]["service"] == grpc_service_name(component), component.name
            for probe in ("livenessProbe", "startupProbe"):
                assert container[probe]["grpc"].get("service", "") == "", f"{component.name}: {probe}"


def render_with(*overrides: str) -> list[dict[str, Any]]:
    command = [helm_binary(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, f"helm template {overrides} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def scrape_annotated(documents: list[dict[str, Any]]) -> dict[str, bool]:
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/scrape")
        == "true"
        for doc in documents
        if doc["kind"] == "Deployment"
    }


def test_pods_are_annotated_for_scraping_only_where_scrapers_are_let_in(renderings: list[Rendering]) -> None:
    """`prometheus.io/*` annotations only when the NetworkPolicies let a scraper reach the metrics
    port (`networkPolicy.metricsFrom`, or no policies): with the defaults every scrape would time out."""
    annotated_files: set[str] = set()
    for rendering in renderings:
        network_policy = deep_merge(chart_defaults()["networkPolicy"], rendering.values.get("networkPolicy", {}))
        metrics = deep_merge(chart_defaults()["metrics"], rendering.values.get("metrics", {}))
        reachable = not network_policy["enabled"] or bool(network_policy["metricsFrom"])
        for component in COMPONENTS:
            deployment = rendering.get("Deployment", fullname(component))
            annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
            annotated = annotations.get("prometheus.io/scrape") == "true"
            assert annotated == (metrics["podAnnotations"] and reachable), f"{rendering.values_file}: {component.name}"
            if not annotated:
                assert not any(key.startswith("prometheus.io/") for key in annotations)
                continue
            annotated_files.add(rendering.values_file)
            port = next(p for p in containers(deployment)[0]["ports"] if p["name"] == "metrics")
            assert annotations["prometheus.io/port"] == str(port["containerPort"]) == str(metrics["port"])
            policy = rendering.find("NetworkPolicy", fullname(component))
            if policy is not None:
                rules = [r for r in policy["spec"]["ingress"] if {"port": "metrics", "protocol": "TCP"} in r["ports"]]
                assert [r["from"] for r in rules] == [network_policy["metricsFrom"]], rendering.values_file
    assert "default-values.yaml" not in annotated_files and "ingress-tls-values.yaml" in annotated_files
    # No policies, annotations asked for (the default): every pod annotated.
    assert all(scrape_annotated(render_with("networkPolicy.enabled=false")).values())
    assert not any(scrape_annotated(render_with()).values())


def test_pods_run_the_entry_points_make_run_uses(renderings: list[Rendering]) -> None:
    """The chart starts each component the way `make run` does (crm_devstack), by console script."""
    from crm_devstack.components import processes

    local = {p.name: [Path(p.command[0]).name, *p.command[1:]] for p in processes("kafka.example.com:9092")}
    assert "gateway" in local
    for rendering in renderings:
        for component in COMPONENTS:
            if component.name not in local:
                assert settings_class(component) is None, f"{component.name} exists but `make run` does not start it"
                continue
            (container,) = containers(rendering.get("Deployment", fullname(component)))
            assert container["command"] == local[component.name], f"{component.name}: not the `make run` command"


def test_image_user_matches_the_pod_security_context() -> None:
    """The image runs as the non-root user the chart's security context expects, and its entry
    point is the component's console script."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    runtime = dockerfile.split(" AS runtime", 1)[1]
    users = [line.split()[1] for line in runtime.splitlines() if line.startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    security = chart_defaults()["podSecurityContext"]
    assert users[-1] == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert 'ln -s "/app/.venv/bin/crm-${SERVICE}" /usr/local/bin/crm-service' in runtime
    assert 'ENTRYPOINT ["crm-service"]' in runtime


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kafka.sasl.existingSecret="], "/kafka/sasl/existingSecret"),
        (["kafka.securityProtocol=SASL_SSL_TYPO"], "/kafka/securityProtocol"),
        (["leads.upstreams[0]=billing"], "/leads/upstreams/0"),
        (["sales.database.existingSecret="], "/sales/database/existingSecret"),
        (["gateway.auth.jwtAlgorithm=HS256"], "/gateway/auth/jwtAlgorithm"),
        (["serviceDesk.autoscaling.targetCPU=0"], "/serviceDesk/autoscaling/targetCPU"),
        (["analytics.replicas=3"], "additional properties 'replicas' not allowed"),
        (["shutdownGraceSeconds=20"], "must not exceed terminationGracePeriodSeconds"),
        (["accounts.autoscaling.minReplicas=5", "accounts.autoscaling.maxReplicas=2"], "above maxReplicas"),
        (["gateway.ingress.enabled=true", "gateway.ingress.hostname="], "gateway.ingress.hostname is required"),
        (["otel.sampler=ratio"], "/otel/sampler"),
        (["database.tls.caKey=certs/ca.crt"], "/database/tls/caKey"),
        # Kubernetes 1.30 to 1.32 (the chart supports them) refuse `preStop.sleep.seconds: 0`.
        (["preStopSleepSeconds=0"], "/preStopSleepSeconds"),
    ],
)
def test_chart_refuses_bad_values(overrides: list[str], message: str) -> None:
    """Mistakes stop `helm install` with a message naming the value, before anything is applied."""
    command = [helm_binary(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode != 0, f"helm accepted {overrides}"
    assert message in result.stderr, result.stderr


def test_the_trace_sampler_reaches_every_pod_that_exports_traces() -> None:
    command = [helm_binary(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for override in (
        "otel.endpoint=http://collector:4317",
        "otel.sampler=parentbased_traceidratio",
        "otel.samplerArg=0.1",
    ):
        command += ["--set", override]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    deployments = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment"]
    assert len(deployments) == len(COMPONENTS)
    for deployment in deployments:
        env = env_of(containers(deployment)[0])
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio", deployment["metadata"]["name"]
        assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.1"


def test_a_kafka_client_certificate_is_mounted_where_every_kafka_client_reads_it(renderings: list[Rendering]) -> None:
    # mTLS (ci/kafka-mtls-values.yaml): the Secret's two keys, the key file readable by the pod's group only.
    rendering = next(r for r in renderings if r.values_file == "kafka-mtls-values.yaml")
    tls = rendering.values["kafka"]["tls"]
    clients = [
        doc
        for doc in rendering.documents
        if doc["kind"] in ("Deployment", "Job") and "CRM_KAFKA_BOOTSTRAP_SERVERS" in env_of(containers(doc)[0])
    ]
    assert len(clients) >= len([c for c in COMPONENTS if c.grpc]), [d["metadata"]["name"] for d in clients]
    for workload in clients:
        env = env_of(containers(workload)[0])
        files = {Path(env[name]["value"]) for name in ("CRM_KAFKA_SSL_CERTFILE", "CRM_KAFKA_SSL_KEYFILE")}
        assert {f.name for f in files} == {tls["clientCertKey"], tls["clientKeyKey"]}
        mounts = {m["mountPath"]: m["name"] for m in containers(workload)[0]["volumeMounts"]}
        (directory,) = {f.parent for f in files}
        volume = next(v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mounts[str(directory)])
        assert volume["secret"]["secretName"] == tls["clientCertExistingSecret"]
        assert {item["path"] for item in volume["secret"]["items"]} == {f.name for f in files}
        assert volume["secret"]["defaultMode"] == 0o440
    default = next(r for r in renderings if r.values_file == "default-values.yaml")
    assert not any(
        "CRM_KAFKA_SSL_CERTFILE" in env_of(containers(doc)[0])
        for doc in default.documents
        if doc["kind"] in ("Deployment", "Job")
    )


def test_a_database_ca_is_mounted_where_every_database_client_reads_it(renderings: list[Rendering]) -> None:
    # ci/database-tls-values.yaml: every pod and migration Job verifies the PostgreSQL server
    # against the operator's CA (PGSSLROOTCERT; PGSSLMODE for URLs without ?ssl=).
    rendering = next(r for r in renderings if r.values_file == "database-tls-values.yaml")
    tls = rendering.values["database"]["tls"]
    workloads = [doc for doc in rendering.documents if doc["kind"] in ("Deployment", "Job")]
    jobs = [doc for doc in workloads if doc["kind"] == "Job"]
    assert len(workloads) == len(COMPONENTS) + len(jobs) and len(jobs) == len(COMPONENTS)
    for workload in workloads:
        name = workload["metadata"]["name"]
        (container,) = containers(workload)
        env = env_of(container)
        assert any(var.endswith("_DATABASE_URL") for var in env), f"{name} connects to no database"
        assert env["PGSSLMODE"]["value"] == "verify-full", name
        ca_file = Path(env["PGSSLROOTCERT"]["value"])
        assert ca_file.name == tls["caKey"], name
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[str(ca_file.parent)]
        assert mount["readOnly"] is True, name
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == tls["caExistingSecret"], name
        assert secret["items"] == [{"key": tls["caKey"], "path": ca_file.name}], name
    default = next(r for r in renderings if r.values_file == "default-values.yaml")
    for doc in default.documents:
        if doc["kind"] in ("Deployment", "Job"):
            assert not set(env_of(containers(doc)[0])) & LIBPQ_VARIABLES, doc["metadata"]["name"]
