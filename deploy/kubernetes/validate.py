#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in deploy/kubernetes/ (`make deploy-check`).

No cluster is involved. Every YAML file here must parse; then:

- Kubernetes' own kinds (Deployment, Service, ConfigMap, HorizontalPodAutoscaler, NetworkPolicy)
  are validated strictly (unknown fields are errors) against the OpenAPI schemas of each
  Kubernetes version in K8S_VERSIONS, as bundled by the `kubernetes-validate` package;
- InferencePool and HTTPRoute against the hand-written schemas in schemas/, and, with
  `--crd FILE` (repeatable), also against the openAPIV3Schema of those CustomResourceDefinitions
  (made strict the same way);
- the endpoint picker's EndpointPickerConfig (inside the `knots-epp` ConfigMap) against
  schemas/endpointpickerconfig-v1alpha1.schema.yaml plus the picker's own loader rules;
- names, labels, ports and references agree across the manifests, and with knots itself: flags
  and environment variables with src/server/config.rs, probe and scrape paths with the routes of
  the server's two listeners (src/server/mod.rs), metric names and labels with
  src/server/metrics.rs, volumes, user and default environment with docker/Dockerfile; the
  endpoint picker scrapes the keyless --metrics-port, which no Service exposes and the
  NetworkPolicy admits only from named peers; what knots writes is on a writable volume; replicas
  share their state database.

Prints one line per check and ends with `deploy-check: N passed, M failed`; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jsonschema
import yaml
from referencing import Registry, Resource

import kubernetes_validate

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCHEMAS = HERE / "schemas"

# Kubernetes minor versions the core kinds are validated against (all bundled by
# kubernetes-validate 1.37.0 from 1.30 on).
K8S_VERSIONS = [f"1.{minor}" for minor in range(30, 38)]

# Hand-written schemas for the custom kinds, by (apiVersion, kind).
CUSTOM_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "knots-deploy/inferencepool-v1",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "knots-deploy/httproute-v1",
}
EPP_SCHEMA = "knots-deploy/endpointpickerconfig-v1alpha1"
EPP_CONFIGMAP, EPP_KEY = "knots-epp", "knots-epp.yaml"

# The endpoint picker's LoRA info labels (the model server protocol's names).
LORA_LABELS = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")

METRIC_SPEC = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?\s*$")
LABEL_PAIR = re.compile(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"?([^"]*?)"?\s*$')


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok    {what}")
        else:
            self.failed += 1
            print(f"FAIL  {what}" + (f": {detail}" if detail else ""))
        return ok

    @staticmethod
    def note(what: str) -> None:
        print(f"note  {what}")


def load_manifests(report: Report) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(HERE.glob("*.yaml")):
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            report.check(False, f"{path.name} parses as YAML", str(e))
            continue
        report.check(bool(loaded), f"{path.name} parses as YAML ({len(loaded)} document(s))")
        docs.extend((path.name, d) for d in loaded)
    return docs


def schema_registry() -> Registry:
    resources = []
    for path in sorted(SCHEMAS.glob("*.schema.yaml")):
        contents = yaml.safe_load(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


def validate_with(registry: Registry, schema_id: str, instance: object) -> list[str]:
    schema = registry.contents(schema_id)
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    ]


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- Schema validation ------------------------------------------------------------------------


def check_core_kind(report: Report, file: str, doc: dict) -> None:
    failures = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path) or "(root)"
            failures.append(f"Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"Kubernetes {version}: {e.message}")
    report.check(
        not failures,
        f"{file}: {name_of(doc)} valid (strict) against Kubernetes "
        f"{K8S_VERSIONS[0]}-{K8S_VERSIONS[-1]} schemas",
        "; ".join(failures[:3]),
    )


def crd_schema(node: object) -> object:
    """A CRD's structural OpenAPI v3 schema as JSON Schema, made strict: objects that list their
    properties refuse others (the API server would prune them), int-or-string and nullable
    become JSON Schema types, CEL rules and defaults are dropped (checked or applied elsewhere)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: crd_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = crd_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [crd_schema(sub) for sub in value]
        elif key in ("description", "default", "example") or key.startswith("x-kubernetes-"):
            continue
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds(paths: list[str]) -> dict[tuple[str, str], tuple[dict, str]]:
    schemas = {}
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            bundle = (doc["metadata"].get("annotations") or {}).get(
                "gateway.networking.k8s.io/bundle-version"
            ) or (doc["metadata"].get("annotations") or {}).get(
                "inference.networking.k8s.io/bundle-version", "?"
            )
            for version in doc["spec"]["versions"]:
                schema = crd_schema(version["schema"]["openAPIV3Schema"])
                source = f"{Path(path).name} ({kind} {group}/{version['name']}, bundle {bundle})"
                schemas[(f"{group}/{version['name']}", kind)] = (schema, source)
    return schemas


def check_custom_kind(report: Report, registry: Registry, crds: dict, file: str, doc: dict) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    errors = validate_with(registry, CUSTOM_SCHEMAS[key], doc)
    report.check(
        not errors,
        f"{file}: {name_of(doc)} valid against schemas/{CUSTOM_SCHEMAS[key].split('/')[1]}",
        "; ".join(errors[:3]),
    )
    if key in crds:
        schema, source = crds[key]
        errors = [
            f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)
        ]
        report.check(not errors, f"{file}: {name_of(doc)} valid (strict) against CRD {source}",
                     "; ".join(errors[:3]))


def check_schemas(report: Report, docs: list, registry: Registry, crds: dict) -> None:
    for file, doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CUSTOM_SCHEMAS:
            check_custom_kind(report, registry, crds, file, doc)
        else:
            check_core_kind(report, file, doc)


# --- The custom kinds' CEL rules that matter here -----------------------------------------------


def check_cel_rules(report: Report, pool: dict, route: dict) -> None:
    ports = [p["number"] for p in pool["spec"]["targetPorts"]]
    report.check(len(ports) == len(set(ports)), "InferencePool target port numbers are unique")
    ref = pool["spec"].get("endpointPickerRef", {})
    report.check(
        ref.get("kind", "Service") != "Service" or "port" in ref,
        "InferencePool endpointPickerRef to a Service has a port",
    )
    bad_paths = []
    for rule in route["spec"].get("rules", []):
        for match in rule.get("matches", []):
            path = match.get("path", {})
            value = path.get("value", "/")
            if path.get("type", "PathPrefix") in ("Exact", "PathPrefix") and (
                not value.startswith("/")
                or any(s in value for s in ("//", "/./", "/../", "%2f", "%2F", "#"))
                or value.endswith(("/..", "/."))
            ):
                bad_paths.append(value)
        for backend in rule.get("backendRefs", []):
            if backend.get("group", "") == "" and backend.get("kind", "Service") == "Service":
                if "port" not in backend:
                    bad_paths.append(f"Service backend {backend['name']} without a port")
    report.check(not bad_paths, "HTTPRoute match paths are absolute and clean; Service backends "
                 "have ports", ", ".join(bad_paths))


# --- knots' own facts, read from its source -----------------------------------------------------


def serve_flags() -> dict[str, str | None]:
    """`knots serve` flag names and their environment variables, from ServeArgs in config.rs."""
    text = (ROOT / "src/server/config.rs").read_text()
    body = text[text.index("pub struct ServeArgs") :]
    body = body[: body.index("\n}\n")]
    flags = {}
    for attr, field in re.findall(r"#\[arg\(([^]]*)\)\]\s*pub (\w+):", body, re.S):
        long = re.search(r'long\s*=\s*"([^"]+)"', attr)
        env = re.search(r'env\s*=\s*"([^"]+)"', attr)
        flags[long.group(1) if long else field.replace("_", "-")] = env.group(1) if env else None
    return flags


def knots_routes() -> set[str]:
    """Every path the servers route: the API listener's and the metrics listener's."""
    text = (ROOT / "src/server/mod.rs").read_text()
    return set(re.findall(r'\.route\(\s*"([^"]+)"', text))


def metrics_routes() -> set[str]:
    """The paths of the --metrics-port listener (served without a key): `metrics_app`."""
    text = (ROOT / "src/server/mod.rs").read_text()
    body = text[text.index("pub fn metrics_app") :]
    body = body[: body.index("\n}\n")]
    return set(re.findall(r'\.route\(\s*"([^"]+)"', body))


def is_postgres(spec: str) -> bool:
    """As store::is_postgres: a state database shared by replicas."""
    return spec.startswith(("postgres://", "postgresql://"))


def knots_metrics() -> str:
    return (ROOT / "src/server/metrics.rs").read_text()


def dockerfile() -> tuple[list[str], str, dict[str, str]]:
    text = (ROOT / "docker/Dockerfile").read_text()
    volumes = yaml.safe_load(re.search(r"^VOLUME (\[.*\])$", text, re.M).group(1))
    user = re.search(r"^USER (\S+)$", text, re.M).group(1)
    env = dict(re.findall(r"\b(KNOTS_[A-Z_]+)=(\S+)", text))
    return volumes, user, env


class FromSecret(str):
    """A setting whose value is in a Secret (`name/key`): not readable here."""


# --- Consistency --------------------------------------------------------------------------------


def one(report: Report, docs: list, kind: str) -> dict | None:
    found = [d for _, d in docs if d.get("kind") == kind]
    report.check(len(found) == 1, f"exactly one {kind}", f"found {len(found)}")
    return found[0] if found else None


def subset(small: dict, big: dict) -> bool:
    return all(big.get(k) == v for k, v in small.items())


def container_args(container: dict) -> dict[str, str]:
    args = {}
    items = container.get("args", [])
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            if "=" in item:
                flag, value = item[2:].split("=", 1)
            else:
                flag = item[2:]
                value = items[i + 1] if i + 1 < len(items) and not items[i + 1].startswith("--") else ""
                i += 1 if value else 0
            args[flag] = value
        i += 1
    return args


def knots_container(dep: dict) -> dict:
    containers = dep["spec"]["template"]["spec"]["containers"]
    return next((c for c in containers if c["name"] == "knots"), containers[0])


def serve_settings(knots: dict, args: dict, flags: dict, docker_env: dict) -> dict[str, str]:
    """The container's effective `knots serve` settings by flag name: the image's ENV, under the
    container's KNOTS_* variables (a FromSecret for one read from a Secret), under its args."""
    by_env = {env: flag for flag, env in flags.items() if env}
    settings = {by_env[k]: v for k, v in docker_env.items() if k in by_env}
    for e in knots.get("env", []):
        if e["name"] in by_env:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            settings[by_env[e["name"]]] = (
                FromSecret(f"{ref['name']}/{ref['key']}") if ref else str(e.get("value", ""))
            )
    settings.update(args)
    return settings


def under(path: str, dirs: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def check_deployment(report: Report, dep: dict) -> tuple[dict, dict, dict]:
    """Returns the pod labels, the container ports by name and the effective knots settings."""
    spec = dep["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    report.check(subset(spec["selector"]["matchLabels"], labels),
                 "Deployment selector matches its pod labels")
    report.check("replicas" not in spec, "Deployment leaves the replica count to the HPA")
    knots = knots_container(dep)
    args = container_args(knots)
    report.check(knots.get("args", [None])[0] == "serve", "container runs `knots serve`")

    flags = serve_flags()
    unknown = sorted(set(args) - set(flags))
    report.check(not unknown, "every flag in args is a `knots serve` flag (config.rs)",
                 ", ".join(unknown))
    volumes, user, docker_env = dockerfile()
    env_names = {e["name"] for e in knots.get("env", []) if e["name"].startswith("KNOTS_")}
    unknown_env = sorted(env_names - set(flags.values()) - set(docker_env))
    report.check(not unknown_env, "every KNOTS_* variable is read by knots (config.rs, Dockerfile)",
                 ", ".join(unknown_env))
    settings = serve_settings(knots, args, flags, docker_env)
    if "metrics-compat" in settings:
        report.check(settings["metrics-compat"] in ("none", "vllm"),
                     "--metrics-compat is none or vllm")

    ports = {p.get("name"): p["containerPort"] for p in knots.get("ports", [])}
    api_port = int(settings.get("port", 8000))
    report.check(api_port in ports.values(),
                 "the container port is knots' --port", f"{api_port} vs {ports}")
    metrics_port = settings.get("metrics-port")
    report.check(
        metrics_port is not None and int(metrics_port) == ports.get("metrics")
        and int(metrics_port) != api_port,
        "knots' --metrics-port is the container port `metrics`, apart from --port",
        f"--metrics-port {metrics_port}, ports {ports}",
    )
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = knots.get(probe, {}).get("httpGet")
        if not report.check(get is not None, f"{probe} is an HTTP GET"):
            continue
        port = ports.get(get["port"]) if isinstance(get["port"], str) else get["port"]
        routes = metrics_routes() if port == ports.get("metrics") else knots_routes()
        report.check(get["path"] in routes and port in ports.values(),
                     f"{probe} {get['path']} is a route of the knots listener on its port")
    report.check(knots.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/ready"
                 and knots.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/health",
                 "readiness is /ready and liveness is /health")
    annotations = pod["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        report.check(annotations["prometheus.io/port"] == str(ports.get("metrics"))
                     and annotations.get("prometheus.io/path", "/metrics") in metrics_routes(),
                     "the prometheus.io/* annotations name the keyless metrics port and path")

    mounts = {m["mountPath"] for m in knots.get("volumeMounts", [])}
    report.check(set(volumes) <= mounts, "the image's volumes are all mounted",
                 f"missing {sorted(set(volumes) - mounts)}")
    report.check(str(pod["spec"].get("securityContext", {}).get("runAsUser")) == user,
                 "pods run as the image's user", f"Dockerfile USER {user}")
    declared = {v["name"] for v in pod["spec"].get("volumes", [])}
    used = {m["name"] for m in knots.get("volumeMounts", [])}
    report.check(used <= declared, "every volume mount names a pod volume",
                 f"{sorted(used - declared)}")

    # What knots writes must be on a writable mount when the root file system is read-only.
    if knots.get("securityContext", {}).get("readOnlyRootFilesystem"):
        writable = {m["mountPath"] for m in knots.get("volumeMounts", []) if not m.get("readOnly")}
        env = {e["name"]: e.get("value") for e in knots.get("env", [])}
        written = {"--adapter-cache": settings.get("adapter-cache", "knots-adapter-cache")}
        state_db = settings.get("state-db", "knots-state.db")
        if not isinstance(state_db, FromSecret) and not is_postgres(state_db) \
                and state_db != ":memory:":
            written["--state-db"] = state_db
        if env.get("HF_HUB_CACHE"):
            written["HF_HUB_CACHE"] = env["HF_HUB_CACHE"]
        for what, path in written.items():
            report.check(path.startswith("/") and under(path, writable),
                         f"{what} ({path}) is on a writable volume (read-only root file system)",
                         f"writable mounts {sorted(writable)}")

    store = settings.get("merge-store")
    if store is not None:
        report.check(store.startswith(("s3://", "file:///")) or store.startswith("/"),
                     f"--merge-store {store} is s3://bucket/prefix, file:///dir or a path")
        if store.startswith("s3://"):
            report.check(
                any("secretRef" in e for e in knots.get("envFrom", []))
                or "AWS_ACCESS_KEY_ID" in {e["name"] for e in knots.get("env", [])},
                "the s3:// merge store gets AWS_* credentials (envFrom a Secret)",
            )
    resources = knots.get("resources", {})
    report.check(bool(resources.get("requests")) and "memory" in resources.get("limits", {}),
                 "the container has resource requests and a memory limit")
    return labels, ports, settings


def check_service(report: Report, svc: dict, labels: dict, ports: dict) -> None:
    report.check(subset(svc["spec"]["selector"], labels), "Service selector matches the pod labels")
    for port in svc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        resolved = ports.get(target) if isinstance(target, str) else target
        report.check(resolved in ports.values(),
                     f"Service port {port['port']} targets the container port", str(target))
        report.check(resolved != ports.get("metrics"),
                     f"Service port {port['port']} is not the keyless metrics port")


def check_pool(report: Report, pool: dict, labels: dict, ports: dict, args: dict) -> None:
    spec = pool["spec"]
    report.check(subset(spec["selector"]["matchLabels"], labels),
                 "InferencePool selector matches the pod labels")
    numbers = {p["number"] for p in spec["targetPorts"]}
    report.check(numbers <= set(ports.values()) and int(args.get("port", 8000)) in numbers,
                 "InferencePool target port is the container port and knots' --port")


def check_route(report: Report, route: dict, pool: dict) -> None:
    refs = [b for r in route["spec"]["rules"] for b in r.get("backendRefs", [])]
    pool_refs = [b for b in refs if b.get("kind") == "InferencePool"]
    report.check(
        bool(pool_refs) and all(
            b.get("group") == "inference.networking.k8s.io"
            and b["name"] == pool["metadata"]["name"]
            and "namespace" not in b
            for b in pool_refs
        ),
        "HTTPRoute backendRef points to the InferencePool (its group, name and namespace)",
    )
    ports = {p["number"] for p in pool["spec"]["targetPorts"]}
    report.check(all(b.get("port", next(iter(ports))) in ports for b in pool_refs),
                 "HTTPRoute backendRef port, if any, is a target port of the pool")


def check_hpa(report: Report, hpa: dict, dep: dict, args: dict) -> None:
    ref = hpa["spec"]["scaleTargetRef"]
    report.check(
        (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"]),
        "HPA targets the knots Deployment",
    )
    metrics = hpa["spec"].get("metrics", [])
    pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
    report.check(any(p["metric"]["name"] == "knots_engine_waiting_requests" for p in pods),
                 "HPA scales on the Pods metric knots_engine_waiting_requests")
    source = knots_metrics()
    for p in pods:
        report.check(f'"{p["metric"]["name"]}"' in source,
                     f"HPA metric {p['metric']['name']} is exported by knots (metrics.rs)")
        selector = p["metric"].get("selector", {}).get("matchLabels", {})
        check_metric_labels(report, f"HPA metric {p['metric']['name']}", p["metric"]["name"],
                            selector, args)


def check_shared_state(report: Report, hpa: dict, settings: dict) -> None:
    """Replicas must share one state database, or an adapter registered through one pod (and an
    experiment's changes) stay on that pod."""
    if hpa["spec"].get("maxReplicas", 1) <= 1:
        return
    state_db = settings.get("state-db", "knots-state.db")
    if isinstance(state_db, FromSecret):
        report.check(True, f"replicas share the state database (KNOTS_STATE_DB from Secret "
                     f"{state_db}; whether it holds a postgres:// URL is not checked here)")
    else:
        report.check(is_postgres(state_db), "replicas share the state database (postgres://)",
                     f"state-db {state_db} is per pod")


def check_metric_labels(report: Report, what: str, name: str, labels: dict, args: dict) -> None:
    """knots' engine gauges carry one label naming the served model: `base` on its own names,
    `model_name` on vLLM's (--metrics-compat=vllm)."""
    if name.startswith("vllm:"):
        report.check(args.get("metrics-compat") == "vllm",
                     f"{what} reads vLLM's name {name}: the Deployment runs --metrics-compat=vllm")
    if not labels:
        return
    models = args.get("model", "").split(",")
    label = {"knots_engine_": "base", "vllm:num_": "model_name", "vllm:kv_": "model_name",
             "vllm:gpu_": "model_name"}
    expected = next((v for k, v in label.items() if name.startswith(k)), None)
    value = labels.get(expected or "")
    report.check(
        expected is not None and set(labels) == {expected} and value in models,
        f"{what} selects label {expected}={value}, a model the Deployment serves",
        f"labels {labels}, models {models}",
    )


# --- The endpoint picker's configuration --------------------------------------------------------


def check_epp(report: Report, docs: list, registry: Registry, labels: dict, ports: dict,
              pool: dict, args: dict) -> None:
    maps = [d for _, d in docs if d.get("kind") == "ConfigMap"
            and d["metadata"]["name"] == EPP_CONFIGMAP]
    if not report.check(len(maps) == 1 and EPP_KEY in maps[0].get("data", {}),
                        f"ConfigMap {EPP_CONFIGMAP} holds {EPP_KEY}"):
        return
    try:
        config = yaml.safe_load(maps[0]["data"][EPP_KEY])
    except yaml.YAMLError as e:
        report.check(False, f"{EPP_KEY} parses as YAML", str(e))
        return
    report.check(True, f"{EPP_KEY} parses as YAML")
    errors = validate_with(registry, EPP_SCHEMA, config)
    if not report.check(not errors, "EndpointPickerConfig valid against "
                        "schemas/endpointpickerconfig-v1alpha1", "; ".join(errors[:3])):
        return

    # The loader's rules: a plugin's name defaults to its type; names are unique; every
    # reference names a defined plugin.
    names = [p.get("name", p["type"]) for p in config["plugins"]]
    report.check(len(names) == len(set(names)), "EPP plugin names are unique")
    refs = [ref["pluginRef"] for prof in config.get("schedulingProfiles", []) for ref in prof["plugins"]]
    for source in config.get("dataLayer", {}).get("sources", []):
        refs.append(source["pluginRef"])
        refs.extend(e["pluginRef"] for e in source.get("extractors", []))
    report.check(set(refs) <= set(names), "every EPP pluginRef names a defined plugin",
                 f"undefined: {sorted(set(refs) - set(names))}")
    profiles = [p["name"] for p in config.get("schedulingProfiles", [])]
    report.check(len(profiles) == len(set(profiles)), "EPP scheduling profile names are unique")
    used = {ref for prof in config.get("schedulingProfiles", []) for ref in
            (r["pluginRef"] for r in prof["plugins"])}
    by_name = {p.get("name", p["type"]): p["type"] for p in config["plugins"]}
    for scorer in ("lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"):
        report.check(any(by_name.get(u) == scorer for u in used),
                     f"the default profile uses the {scorer}")

    # The data source scrapes each pod at the pool's target port, or at its `port` parameter
    # (one override for every endpoint: only right for a pool with one target port).
    params = next(p for p in config["plugins"] if p["type"] == "metrics-data-source").get(
        "parameters", {})
    targets = [p["number"] for p in pool["spec"]["targetPorts"]]
    if "port" in params:
        report.check(len(targets) == 1, "EPP scrape port override on a pool with one target port")
    scrape_port = params.get("port", targets[0])
    keyless = scrape_port == ports.get("metrics")
    report.check(keyless or "api-keys" not in args,
                 "EPP scrapes the keyless --metrics-port (knots runs with --api-keys)",
                 f"port {scrape_port}, metrics port {ports.get('metrics')}")
    path = params.get("path", "/metrics")
    report.check(path == "/metrics" and path in (metrics_routes() if keyless else knots_routes()),
                 f"EPP scrapes /metrics, a route of the listener on port {scrape_port}")
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    check_engine_mapping(report, extractor.get("parameters", {}), labels, args)


def check_engine_mapping(report: Report, params: dict, labels: dict, args: dict) -> None:
    engines = {e["name"]: e for e in params.get("engineConfigs", [])}
    builtin = {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton"}
    default = params.get("defaultEngine", "vllm")
    report.check(default in engines or default in builtin,
                 f"EPP defaultEngine {default} has an engine config")
    key = params.get("engineLabelKey", "llm-d.ai/engine-type")
    pod_engine = labels.get(key)
    report.check(pod_engine in engines, f"pods carry {key}={pod_engine}, an engine config's name")
    engine = engines.get(pod_engine) or engines.get(default)
    if engine is None:
        return
    source = knots_metrics()
    for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"):
        spec = engine.get(field, "")
        match = METRIC_SPEC.match(spec)
        if not report.check(bool(match), f"EPP {field} is set and parses", repr(spec)):
            continue
        name, selector = match.group(1), match.group(2) or ""
        report.check(f'"{name}"' in source or f'("{name}")' in source,
                     f"EPP {field} {name} is exported by knots (metrics.rs)")
        pairs = dict(LABEL_PAIR.match(p).groups() for p in selector.split(",") if p.strip())
        check_metric_labels(report, f"EPP {field}", name, pairs, args)
    report.check(all(label in source for label in LORA_LABELS),
                 "knots' LoRA info series has the labels the EPP reads "
                 f"({', '.join(LORA_LABELS)})")


def check_network_policy(report: Report, policy: dict, labels: dict, ports: dict) -> None:
    spec = policy["spec"]
    report.check(subset(spec["podSelector"].get("matchLabels", {}), labels)
                 and bool(spec["podSelector"].get("matchLabels")),
                 "NetworkPolicy selects the knots pods")
    report.check("Ingress" in spec.get("policyTypes", ["Ingress"]), "NetworkPolicy limits ingress")
    rules = spec.get("ingress", [])

    def resolve(port: object) -> int | None:
        return ports.get(port) if isinstance(port, str) else port

    named = [p.get("port") for r in rules for p in r.get("ports", [])]
    bad = [p for p in named if p is not None and resolve(p) not in ports.values()]
    report.check(not bad, "NetworkPolicy ports are container ports", f"{bad}")

    def admits(rule: dict, number: int) -> bool:
        rule_ports = rule.get("ports", [])
        return not rule_ports or any(
            p.get("port") is None or resolve(p["port"]) == number for p in rule_ports)

    api = ports.get("http")
    metrics = ports.get("metrics")
    report.check(any(admits(r, api) and not r.get("from") for r in rules),
                 "NetworkPolicy admits every peer to the API port")
    metric_rules = [r for r in rules if admits(r, metrics)]
    report.check(bool(metric_rules) and all(r.get("from") for r in metric_rules),
                 "NetworkPolicy admits only named peers to the keyless metrics port "
                 "(the endpoint picker, Prometheus)")


def run_checks(docs: list, registry: Registry, crds: dict, report: Report) -> Report:
    for (api, kind), (_, source) in sorted(crds.items()):
        if (api, kind) in CUSTOM_SCHEMAS:
            report.note(f"also validating {kind} against {source}")
    check_schemas(report, docs, registry, crds)
    dep = one(report, docs, "Deployment")
    svc = one(report, docs, "Service")
    pool = one(report, docs, "InferencePool")
    route = one(report, docs, "HTTPRoute")
    hpa = one(report, docs, "HorizontalPodAutoscaler")
    policy = one(report, docs, "NetworkPolicy")
    if all((dep, svc, pool, route, hpa, policy)):
        labels, ports, settings = check_deployment(report, dep)
        check_service(report, svc, labels, ports)
        check_pool(report, pool, labels, ports, settings)
        check_cel_rules(report, pool, route)
        check_route(report, route, pool)
        check_hpa(report, hpa, dep, settings)
        check_shared_state(report, hpa, settings)
        check_epp(report, docs, registry, labels, ports, pool, settings)
        check_network_policy(report, policy, labels, ports)
    return report


def kind(docs: list, wanted: str) -> dict:
    return next(d for _, d in docs if d.get("kind") == wanted)


def epp_edit(edit):
    """A mutation of the EndpointPickerConfig inside the ConfigMap."""
    def mutate(docs: list) -> None:
        data = kind(docs, "ConfigMap")["data"]
        config = yaml.safe_load(data[EPP_KEY])
        edit(config)
        data[EPP_KEY] = yaml.safe_dump(config)
    return mutate


def container(docs: list) -> dict:
    return kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def set_arg(flag: str, value: str | None):
    """A mutation of one `--flag=value` of the knots container (None drops it)."""
    def mutate(docs: list) -> None:
        args = [a for a in container(docs)["args"] if not a.startswith(f"--{flag}=")]
        container(docs)["args"] = args + ([f"--{flag}={value}"] if value is not None else [])
    return mutate


def drop_env(name: str):
    def mutate(docs: list) -> None:
        container(docs)["env"] = [e for e in container(docs)["env"] if e["name"] != name]
    return mutate


def policy_rules(docs: list) -> list:
    return kind(docs, "NetworkPolicy")["spec"]["ingress"]


# Each of these breaks the manifests in one way that some check must catch (`--self-test`).
MUTATIONS = {
    "unknown container field": lambda d: container(d).update(imagePullPolcy="Always"),
    "Service selector off": lambda d: kind(d, "Service")["spec"]["selector"].update(
        {"app.kubernetes.io/name": "other"}),
    "Service targetPort unknown": lambda d: kind(d, "Service")["spec"]["ports"][0].update(
        targetPort="grpc"),
    "Service exposes the metrics port": lambda d: kind(d, "Service")["spec"]["ports"].append(
        {"name": "metrics", "port": 9090, "targetPort": "metrics"}),
    "InferencePool unknown field": lambda d: kind(d, "InferencePool")["spec"].update(
        targetPortNumber=8000),
    "InferencePool bad failureMode": lambda d: kind(d, "InferencePool")["spec"][
        "endpointPickerRef"].update(failureMode="Open"),
    "InferencePool port off": lambda d: kind(d, "InferencePool")["spec"].update(
        targetPorts=[{"number": 8080}]),
    "InferencePool selector off": lambda d: kind(d, "InferencePool")["spec"]["selector"].update(
        matchLabels={"app": "knots"}),
    "HTTPRoute to another pool": lambda d: kind(d, "HTTPRoute")["spec"]["rules"][0][
        "backendRefs"][0].update(name="other"),
    "HTTPRoute old pool group": lambda d: kind(d, "HTTPRoute")["spec"]["rules"][0][
        "backendRefs"][0].update(group="inference.networking.x-k8s.io"),
    "HTTPRoute relative path": lambda d: kind(d, "HTTPRoute")["spec"]["rules"][0]["matches"][
        0]["path"].update(value="v1/completions"),
    "HPA targets another Deployment": lambda d: kind(d, "HorizontalPodAutoscaler")["spec"][
        "scaleTargetRef"].update(name="other"),
    "HPA on an unknown metric": lambda d: kind(d, "HorizontalPodAutoscaler")["spec"]["metrics"][
        0]["pods"]["metric"].update(name="knots_queue_depth"),
    "HPA base label off": lambda d: kind(d, "HorizontalPodAutoscaler")["spec"]["metrics"][0][
        "pods"]["metric"]["selector"]["matchLabels"].update(base="llama"),
    "unknown knots flag": lambda d: container(d)["args"].append("--max-queue-depth=4"),
    "unknown KNOTS_ variable": lambda d: container(d)["env"].append(
        {"name": "KNOTS_QUEUE", "value": "4"}),
    "readiness on /health": lambda d: container(d)["readinessProbe"]["httpGet"].update(
        path="/health"),
    "probe on a missing route": lambda d: container(d)["livenessProbe"]["httpGet"].update(
        path="/healthz"),
    "state volume not mounted": lambda d: container(d).update(volumeMounts=[
        m for m in container(d)["volumeMounts"] if m["mountPath"] != "/state"]),
    "metrics port not a container port": set_arg("metrics-port", "9091"),
    "no metrics port": set_arg("metrics-port", None),
    "adapter cache on the read-only root": set_arg("adapter-cache", None),
    "adapter cache not mounted": set_arg("adapter-cache", "/var/cache/knots"),
    "hub cache on the read-only root": lambda d: next(
        e for e in container(d)["env"] if e["name"] == "HF_HUB_CACHE").update(
        value="/nonexistent/.cache/huggingface"),
    "per-pod state with several replicas": drop_env("KNOTS_STATE_DB"),
    "S3 merge store without credentials": lambda d: container(d).pop("envFrom"),
    "merge store of an unknown scheme": set_arg("merge-store", "gs://knots-merges/prod"),
    "Prometheus annotation on the API port": lambda d: kind(d, "Deployment")["spec"]["template"][
        "metadata"]["annotations"].update({"prometheus.io/port": "8000"}),
    "EPP unknown plugin type": epp_edit(lambda c: c["plugins"].append({"type": "lora-scorer"})),
    "EPP unknown parameter": epp_edit(lambda c: c["plugins"][0]["parameters"].update(
        timeout="1s")),
    "EPP scrapes the API port": epp_edit(lambda c: c["plugins"][0]["parameters"].update(
        port=8000)),
    "EPP scrape port unset": epp_edit(lambda c: c["plugins"][0]["parameters"].pop("port")),
    "EPP scrape path not on the metrics listener": epp_edit(
        lambda c: c["plugins"][0]["parameters"].update(path="/v1/models")),
    "EPP undefined pluginRef": epp_edit(lambda c: c["schedulingProfiles"][0]["plugins"].append(
        {"pluginRef": "prefix-cache-scorer"})),
    "EPP duplicate plugin": epp_edit(lambda c: c["plugins"].append({"type": "queue-scorer"})),
    "EPP wrong metric name": epp_edit(lambda c: c["plugins"][1]["parameters"]["engineConfigs"][
        0].update(queuedRequestsSpec="knots_waiting_requests")),
    "EPP vLLM name without compat": epp_edit(lambda c: c["plugins"][1]["parameters"][
        "engineConfigs"][0].update(kvUsageSpec="vllm:kv_cache_usage_perc")),
    "EPP engine label off": epp_edit(lambda c: c["plugins"][1]["parameters"].update(
        engineLabelKey="inference.networking.k8s.io/engine-type")),
    "EPP old apiVersion": epp_edit(lambda c: c.update(
        apiVersion="inference.networking.x-k8s.io/v1alpha1")),
    "NetworkPolicy selector off": lambda d: kind(d, "NetworkPolicy")["spec"]["podSelector"][
        "matchLabels"].update({"app.kubernetes.io/name": "other"}),
    "NetworkPolicy opens the metrics port to all": lambda d: policy_rules(d)[1].pop("from"),
    "NetworkPolicy admits nobody to the metrics port": lambda d: policy_rules(d).pop(1),
    "NetworkPolicy closes the API port": lambda d: policy_rules(d).pop(0),
    "NetworkPolicy unknown port name": lambda d: policy_rules(d)[0]["ports"][0].update(
        port="api"),
    "NetworkPolicy unknown field": lambda d: kind(d, "NetworkPolicy")["spec"].update(
        ingressRules=[]),
}


def self_test(docs: list, registry: Registry, crds: dict) -> int:
    """Each mutation must fail at least one check; the unmutated manifests must pass."""
    import contextlib
    import copy
    import io

    def quiet_run(candidate: list) -> Report:
        with contextlib.redirect_stdout(io.StringIO()):
            return run_checks(candidate, registry, crds, Report())

    clean = quiet_run(docs)
    report = Report()
    report.check(clean.failed == 0, "self-test: the manifests pass unchanged")
    for name, mutate in MUTATIONS.items():
        candidate = copy.deepcopy(docs)
        mutate(candidate)
        report.check(quiet_run(candidate).failed > 0, f"self-test: caught {name}")
    print(f"deploy-check self-test: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crd", action="append", default=[],
                        help="a CustomResourceDefinition YAML file to validate custom kinds against "
                        "as well (repeatable)")
    parser.add_argument("--self-test", action="store_true",
                        help="check that each of a set of broken variants of the manifests fails")
    options = parser.parse_args()

    report = Report()
    docs = load_manifests(report)
    registry = schema_registry()
    crds = load_crds(options.crd)
    if options.self_test:
        return self_test(docs, registry, crds)
    run_checks(docs, registry, crds, report)
    print(f"deploy-check: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
