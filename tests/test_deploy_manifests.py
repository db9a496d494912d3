"""The Kubernetes manifests in deploy/kubernetes, validated offline.

`kubectl kustomize deploy/kubernetes` renders them; the built-in kinds are validated with
kubernetes-validate (strict: unknown fields fail) for the Kubernetes versions below, the custom resources
(InferencePool, InferenceObjective, Gateway, HTTPRoute) with jsonschema against the CRD schemas vendored
in tests/data/k8s-schemas (closed the way the API server's strict field validation treats them), and the
endpoint picker's EndpointPickerConfig against a schema derived from the GAIE v1.5.0 source, with the
plugin types that EPP registers (see tests/data/k8s-schemas/SOURCES.md).

Then the cross-references a schema cannot see: the InferencePool selects the server's pods and targets its
HTTP port, the probes hit /health on that port, the HTTPRoute sends to the pool, the EPP config enables the
LoRA-affinity, queue and KV-cache scorers and reads metric names the server really exports, the server's
flags parse with its own argument parser. Every check is a function over the rendered documents, and
`test_each_check_can_fail` breaks the manifests once per check and requires that check to fail.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

try:
    import kubernetes_validate
except ImportError as exc:  # a clear failure, not a skip: the package belongs to the test extra
    raise ImportError("tests/test_deploy_manifests.py needs kubernetes-validate "
                      "(pip install kubernetes-validate; the `test` extra)") from exc

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "data" / "k8s-schemas"

# The cluster versions the built-in kinds are validated for: the oldest the README promises and the
# newest kubernetes-validate 1.37 knows (GAIE v1.5.0 itself builds against client-go 0.35, Kubernetes 1.35).
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
NAMESPACE = "tessera"
POOL_GROUP = "inference.networking.k8s.io"
BUILTIN_GROUPS = {"", "apps", "rbac.authorization.k8s.io"}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# the scorers this deployment is about; each must be enabled with a positive weight
SCORERS = ("lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer")
# the gauges the endpoint picker routes on, exactly as the server must export them
GATEWAY_GAUGES = ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info")
LORA_INFO_LABELS = {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}


# -- rendering and lookups ------------------------------------------------------------------------------

def render() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize deploy/kubernetes` cannot render the manifests")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize deploy/kubernetes failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return render()


@pytest.fixture
def docs(rendered) -> list[dict]:
    return copy.deepcopy(rendered)


def group_of(doc: dict) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def server(docs):
    return find(docs, "Deployment", "tessera")


def epp(docs):
    return find(docs, "Deployment", "tessera-epp")


def container(deployment: dict, name: str | None = None) -> dict:
    cs = deployment["spec"]["template"]["spec"]["containers"]
    return cs[0] if name is None else next(c for c in cs if c["name"] == name)


def container_port(c: dict, port) -> int:
    """A probe's or Service's port (a number or a port name) as the container's port number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    assert port in named, f"container {c['name']} has no port named {port!r}"
    return named[port]


def selects(match_labels: dict, deployment: dict) -> bool:
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def server_args(docs):
    """The server container's flags, parsed by the server's own argument parser (a misspelt flag, or a
    value its type rejects, exits here as it would in the pod)."""
    from server.cli import build_parser

    c = container(server(docs), "tessera")
    assert c["command"][-2:] == ["-m", "server"], c["command"]
    parser = build_parser()

    def error(message):
        raise AssertionError(f"python -m server rejects the container's args: {message}")
    parser.error = error
    return parser.parse_args(c.get("args", []))


def flag(args: list[str], name: str) -> str | None:
    """`--name=value` or `--name value` in a container's args (the EPP's Go flags)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def epp_config(docs) -> dict:
    """The EndpointPickerConfig the EPP reads: the ConfigMap its --config-file points into."""
    d = epp(docs)
    c = container(d, "epp")
    path = flag(c["args"], "--config-file")
    assert path, "the EPP has no --config-file"
    mount = next((m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    assert mount, f"--config-file {path} is under no volume mount of the EPP"
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    volume = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert "configMap" in volume, f"volume {volume['name']} is not a ConfigMap"
    cm = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert key in cm.get("data", {}), f"ConfigMap {cm['metadata']['name']} has no key {key}"
    return yaml.safe_load(cm["data"][key])


def crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for f in sorted(SCHEMAS.glob("*.json")):
        data = json.loads(f.read_text())
        if "openAPIV3Schema" in data:
            out[(data["apiVersion"], data["kind"])] = data
    return out


def closed(schema: dict) -> dict:
    """A CRD schema as the API server's strict field validation applies it: an object that lists its
    properties accepts no others (unless it says so with additionalProperties or
    x-kubernetes-preserve-unknown-fields). allOf / anyOf / oneOf / not stay as they are: in a structural
    schema they only constrain values of fields declared outside them, so closing them would be wrong."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = closed(out["items"])
    return out


def epp_schema() -> dict:
    return json.loads((SCHEMAS / "endpointpickerconfig.inference.networking.x-k8s.io.v1alpha1.json").read_text())


def exported_metrics() -> dict[str, set[str]]:
    """Metric name -> label names of what the server's /metrics serves, from server/metrics.py itself with
    an engine reading holding one running and one waiting adapter."""
    from server.metrics import Metrics

    class Reading(dict):
        def __missing__(self, key):
            return {"a": 1} if key.startswith("adapters_") or key.endswith(("_tiers", "_kinds")) else 0

    text = Metrics(lambda: Reading(max_loras=4, adapters_running={"a": 1}, adapters_waiting={"b": 1})).render()
    names: dict[str, set[str]] = {}
    for line in text.decode().splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        if m:
            labels = {kv.split("=", 1)[0] for kv in re.findall(r'(\w+="[^"]*")', m.group(2) or "")}
            names.setdefault(m.group(1), set()).update(labels)
    return names


# -- the checks -----------------------------------------------------------------------------------------

def check_renders(docs):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind, name in [("Namespace", NAMESPACE), ("Deployment", "tessera"), ("Service", "tessera"),
                       ("PersistentVolumeClaim", "tessera-adapters"), ("InferencePool", "tessera"),
                       ("InferenceObjective", "interactive"), ("ServiceAccount", "tessera-epp"),
                       ("Role", "tessera-epp"), ("RoleBinding", "tessera-epp"), ("Deployment", "tessera-epp"),
                       ("Service", "tessera-epp"), ("Gateway", "inference-gateway"), ("HTTPRoute", "tessera")]:
        assert (kind, name) in kinds, f"{kind} {name} is not rendered"
    for d in docs:
        assert DNS1123.match(d["metadata"]["name"]), d["metadata"]["name"]
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']} {d['metadata']['name']} namespace"


def check_builtin_kinds(docs):
    n = 0
    for d in docs:
        if group_of(d) not in BUILTIN_GROUPS:
            continue
        for wanted in KUBERNETES_VERSIONS:
            try:
                version = kubernetes_validate.validate(d, wanted, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                raise AssertionError(f"{d['kind']} {d['metadata']['name']} (Kubernetes {wanted}): {where}: "
                                     f"{e.message}") from None
            assert version == wanted.rsplit(".", 1)[0], f"validated against {version}, not {wanted}"
        n += 1
    assert n >= 9, f"only {n} built-in objects validated"


def check_custom_resources(docs):
    schemas = crd_schemas()
    n = 0
    for d in docs:
        if group_of(d) in BUILTIN_GROUPS:
            continue
        key = (d["apiVersion"], d["kind"])
        assert key in schemas, f"no vendored CRD schema for {key}: every custom resource must be validated"
        try:
            jsonschema.validate(d, closed(schemas[key]["openAPIV3Schema"]), cls=jsonschema.Draft7Validator)
        except jsonschema.ValidationError as e:
            where = ".".join(str(p) for p in e.absolute_path)
            raise AssertionError(f"{d['kind']} {d['metadata']['name']}: {where}: {e.message}") from None
        n += 1
    assert n >= 4, f"only {n} custom resources validated"
    # the CEL rules of the InferencePool CRD these manifests touch (jsonschema does not evaluate CEL)
    pool = find(docs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref, "endpointPickerRef of kind Service needs a port"
    numbers = [p["number"] for p in pool["spec"]["targetPorts"]]
    assert len(numbers) == len(set(numbers)), "targetPorts must be unique"


def check_pool_selects_server(docs):
    pool, dep = find(docs, "InferencePool"), server(docs)
    match = pool["spec"]["selector"]["matchLabels"]
    assert selects(match, dep), f"InferencePool selector {match} does not match the server's pod labels"
    assert selects(dep["spec"]["selector"]["matchLabels"], dep), "the Deployment's selector misses its own pods"
    others = [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment" and d is not dep and selects(match, d)]
    assert not others, f"the InferencePool also selects {others}"


def check_pool_target_port(docs):
    pool, args = find(docs, "InferencePool"), server_args(docs)
    c = container(server(docs), "tessera")
    http = container_port(c, "http")
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [http], "targetPorts must be the http port"
    assert http == args.http_port, f"container port http={http} but --http-port={args.http_port}"
    assert pool["spec"].get("appProtocol", "http") == "http", "the server's port 8000 speaks HTTP/1.1 (and h2c)"


def check_pool_names_epp(docs):
    pool = find(docs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    svc = find(docs, "Service", ref["name"])
    d, c = epp(docs), container(epp(docs), "epp")
    assert selects(svc["spec"]["selector"], d), f"Service {svc['metadata']['name']} does not select the EPP pods"
    port = next((p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]), None)
    assert port, f"Service {ref['name']} has no port {ref['port']['number']}"
    grpc = int(flag(c["args"], "--grpc-port") or 9002)
    assert container_port(c, port.get("targetPort", port["port"])) == grpc, "the EPP Service misses the ext_proc port"
    assert flag(c["args"], "--pool-name") == pool["metadata"]["name"], "the EPP serves another pool"
    assert flag(c["args"], "--pool-group") in (None, POOL_GROUP), "the EPP watches another InferencePool group"
    ns = flag(c["args"], "--pool-namespace")
    env = {e["name"]: e for e in c.get("env", [])}
    assert ns == NAMESPACE or (ns is None and env["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"]
                               == "metadata.namespace"), "the EPP looks for the pool in another namespace"


def check_probes(docs):
    c, args = container(server(docs), "tessera"), server_args(docs)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe)
        assert p and "httpGet" in p, f"{probe} must be an HTTP probe"
        assert p["httpGet"]["path"] == "/health", f"{probe} path {p['httpGet']['path']}"
        assert container_port(c, p["httpGet"]["port"]) == args.http_port, f"{probe} is not on the http port"
    # a draining pod answers 503 for --shutdown-grace: liveness must not restart it meanwhile
    live = c["livenessProbe"]
    window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
    assert window > args.shutdown_grace, f"liveness gives up after {window} s, within --shutdown-grace"


def check_server_flags(docs):
    args, d = server_args(docs), server(docs)
    c = container(d, "tessera")
    assert args.host == "0.0.0.0", "the server must listen on all interfaces in a pod"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.port, "metrics": args.metrics_port}, ports
    mount = next((m for m in c["volumeMounts"] if m["mountPath"] == str(args.adapter_root)), None)
    assert mount, f"--adapter-root {args.adapter_root} is not a volume mount"
    assert mount.get("readOnly"), "the adapter volume is mounted read-write"
    vol = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    claim = vol["persistentVolumeClaim"]["claimName"]
    find(docs, "PersistentVolumeClaim", claim)
    assert args.device == "cuda", "a GPU pod should refuse to start on the CPU"


def check_termination_grace(docs):
    d, args = server(docs), server_args(docs)
    c = container(d, "tessera")
    grace = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = 0
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        assert cmd[0] == "sleep", cmd
        sleep = int(cmd[1])
    elif "sleep" in pre:
        sleep = pre["sleep"]["seconds"]
    assert grace > sleep + args.shutdown_grace, (f"terminationGracePeriodSeconds {grace} <= preStop {sleep} s + "
                                                 f"--shutdown-grace {args.shutdown_grace} s")


def check_gpu(docs):
    res = container(server(docs), "tessera")["resources"]
    assert str(res.get("limits", {}).get("nvidia.com/gpu")) == "1", "no nvidia.com/gpu limit"
    req = res.get("requests", {}).get("nvidia.com/gpu")
    assert req is None or str(req) == "1", "an extended resource's request must equal its limit"


def check_prometheus(docs):
    d, args = server(docs), server_args(docs)
    ann = d["spec"]["template"]["metadata"].get("annotations", {})
    assert ann.get("prometheus.io/scrape") == "true", "no prometheus.io/scrape annotation"
    assert ann.get("prometheus.io/port") == str(args.metrics_port), "prometheus.io/port is not --metrics-port"
    assert ann.get("prometheus.io/path", "/metrics") == "/metrics"


def check_service(docs):
    svc, d = find(docs, "Service", "tessera"), server(docs)
    c = container(d, "tessera")
    assert selects(svc["spec"]["selector"], d), "the Service does not select the server's pods"
    ports = {p["name"]: (p["port"], container_port(c, p.get("targetPort", p["port"]))) for p in svc["spec"]["ports"]}
    assert ports == {"http": (8000, 8000), "grpc": (50051, 50051), "metrics": (9400, 9400)}, ports


def check_route(docs):
    route, pool = find(docs, "HTTPRoute"), find(docs, "InferencePool")
    gateways = {g["metadata"]["name"] for g in docs if g["kind"] == "Gateway"}
    for parent in route["spec"]["parentRefs"]:
        assert parent.get("kind", "Gateway") == "Gateway" and parent["name"] in gateways, f"parentRef {parent}"
    refs = [b for rule in route["spec"]["rules"] for b in rule.get("backendRefs", [])]
    assert refs, "the HTTPRoute has no backendRefs"
    for b in refs:
        assert (b.get("group"), b.get("kind"), b["name"]) == (POOL_GROUP, "InferencePool", pool["metadata"]["name"]), b
        assert "port" not in b, "an InferencePool backendRef takes no port (the pool's targetPorts apply)"
    gw = find(docs, "Gateway")
    assert gw["spec"]["gatewayClassName"] and gw["spec"]["listeners"], "the Gateway has no class or listener"


def check_objective(docs):
    obj, pool = find(docs, "InferenceObjective"), find(docs, "InferencePool")
    ref = obj["spec"]["poolRef"]
    assert ref["name"] == pool["metadata"]["name"], "the InferenceObjective names another pool"
    assert ref.get("group", POOL_GROUP) == POOL_GROUP and ref.get("kind", "InferencePool") == "InferencePool", ref
    assert isinstance(obj["spec"].get("priority"), int), "the InferenceObjective sets no priority"


def check_rbac(docs):
    d = epp(docs)
    sa = d["spec"]["template"]["spec"].get("serviceAccountName")
    find(docs, "ServiceAccount", sa)
    bindings = [b for b in docs if b["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == NAMESPACE
                        for s in b["subjects"])]
    assert bindings, f"no RoleBinding for ServiceAccount {sa}"
    rules = [r for b in bindings for r in find(docs, b["roleRef"]["kind"], b["roleRef"]["name"])["rules"]]

    def allowed(group, resource):
        return any(group in r["apiGroups"] and resource in r["resources"]
                   and {"get", "list", "watch"} <= set(r["verbs"]) for r in rules)
    for group, resource in [("", "pods"), (POOL_GROUP, "inferencepools"),
                            ("inference.networking.x-k8s.io", "inferenceobjectives")]:
        assert allowed(group, resource), f"the EPP may not get/list/watch {resource}"


def check_epp_config(docs):
    cfg, meta = epp_config(docs), epp_schema()
    try:
        jsonschema.validate(cfg, meta["schema"], cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as e:
        raise AssertionError(f"EndpointPickerConfig {'.'.join(map(str, e.absolute_path))}: {e.message}") from None
    registered, roles = set(meta["registeredPluginTypes"]), meta["pluginRoles"]
    assert set(cfg.get("featureGates", [])) <= set(meta["registeredFeatureGates"]), cfg.get("featureGates")
    plugins = {}
    for p in cfg["plugins"]:
        assert p["type"] in registered, f"plugin type {p['type']!r} is not registered by the v1.5.0 EPP"
        name = p.get("name") or p["type"]
        assert name not in plugins, f"two plugins named {name}"
        plugins[name] = p
        if "parameters" in p and p["type"] in meta["pluginParameters"]:
            try:
                jsonschema.validate(p["parameters"], meta["pluginParameters"][p["type"]])
            except jsonschema.ValidationError as e:
                raise AssertionError(f"parameters of {name}: {e.message}") from None
    role = {name: next((r for r, types in roles.items() if p["type"] in types), None) for name, p in plugins.items()}
    profiles = cfg["schedulingProfiles"]
    assert len({p["name"] for p in profiles}) == len(profiles), "duplicate profile names"
    for prof in profiles:
        refs = [r["pluginRef"] for r in prof["plugins"]]
        for r in refs:
            assert r in plugins, f"profile {prof['name']} references undefined plugin {r}"
        assert sum(role[r] == "picker" for r in refs) == 1, f"profile {prof['name']} needs exactly one picker"
        for r in prof["plugins"]:
            assert role[r["pluginRef"]] != "scorer" or r.get("weight", 1) > 0, f"{r['pluginRef']} has weight <= 0"
    enabled = {plugins[r["pluginRef"]]["type"] for r in profiles[0]["plugins"] if r.get("weight", 1) > 0}
    for scorer in SCORERS:
        assert scorer in enabled, f"{scorer} is not enabled in profile {profiles[0]['name']}"
    if len(profiles) == 1:
        assert any(role[n] == "profileHandler" for n in plugins), "no profile handler"
    for src in cfg["dataLayer"]["sources"]:
        assert role.get(src["pluginRef"]) == "dataSource", f"{src['pluginRef']} is not a data source"
        for ex in src["extractors"]:
            assert role.get(ex["pluginRef"]) == "extractor", f"{ex['pluginRef']} is not an extractor"


def check_epp_reads_server_metrics(docs):
    cfg, d = epp_config(docs), server(docs)
    extractor = next(p for p in cfg["plugins"] if p["type"] == "core-metrics-extractor")
    params = extractor.get("parameters", {})
    label_key = params.get("engineLabelKey", "inference.networking.k8s.io/engine-type")
    engine = d["spec"]["template"]["metadata"]["labels"].get(label_key, params.get("defaultEngine", "vllm"))
    assert params.get("defaultEngine") == engine, (f"the pods' engine type {engine!r} is not the defaultEngine "
                                                   f"{params.get('defaultEngine')!r} (unlabelled pods use that one)")
    spec = next((e for e in params.get("engineConfigs", []) if e["name"] == engine), None)
    assert spec, f"the pods' engine type {engine!r} has no engineConfigs entry"
    source = next(p for p in cfg["plugins"] if p["type"] == "metrics-data-source")
    assert source.get("parameters", {}).get("path", "/metrics") == "/metrics"
    exported = exported_metrics()
    wanted = {k: v for k, v in spec.items() if k.endswith("Spec") and v}
    for key, metric in wanted.items():
        name = metric.split("{")[0]
        assert name in exported, f"engineConfigs {key}: the server exports no {name}"
    assert {spec.get("queuedRequestsSpec"), spec.get("kvUsageSpec"), spec.get("loraSpec")} == set(GATEWAY_GAUGES)
    assert LORA_INFO_LABELS <= exported["vllm:lora_requests_info"], exported["vllm:lora_requests_info"]


def check_readme(docs, readme: Path = DEPLOY / "README.md"):
    text = readme.read_text()
    for name in (*GATEWAY_GAUGES, *LORA_INFO_LABELS, "/v1/load_lora_adapter", "--adapter-root",
                 "kubectl apply -k deploy/kubernetes"):
        assert name in text, f"deploy/kubernetes/README.md does not mention {name}"


CHECKS = [check_renders, check_builtin_kinds, check_custom_resources, check_pool_selects_server,
          check_pool_target_port, check_pool_names_epp, check_probes, check_server_flags, check_termination_grace,
          check_gpu, check_prometheus, check_service, check_route, check_objective, check_rbac, check_epp_config,
          check_epp_reads_server_metrics, check_readme]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_manifests(check, docs):
    check(docs)


# -- every check can fail: one breakage each ------------------------------------------------------------

def _pod_labels(docs):
    return server(docs)["spec"]["template"]["metadata"]["labels"]


def _args(docs, c="tessera"):
    return container(server(docs), c)["args"]


def _set_arg(args: list[str], name: str, value: str):
    i = next(i for i, a in enumerate(args) if a.startswith(name + "="))
    args[i] = f"{name}={value}"


def _epp_cfg_edit(docs, edit):
    d = epp(docs)
    c = container(d, "epp")
    path = flag(c["args"], "--config-file")
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"]))
    vol = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = find(docs, "ConfigMap", vol["configMap"]["name"])
    key = Path(path).name
    cfg = yaml.safe_load(cm["data"][key])
    edit(cfg)
    cm["data"][key] = yaml.safe_dump(cfg)


def _drop_profile_plugin(cfg, plugin_type):
    cfg["schedulingProfiles"][0]["plugins"] = [r for r in cfg["schedulingProfiles"][0]["plugins"]
                                               if r["pluginRef"] != plugin_type]


def _extractor(cfg):
    return next(p for p in cfg["plugins"] if p["type"] == "core-metrics-extractor")


BREAKAGES = {
    "renders: wrong namespace": (
        check_renders, lambda d: find(d, "Service", "tessera")["metadata"].update(namespace="x")),
    "builtin: unknown Deployment field": (
        check_builtin_kinds, lambda d: container(server(d), "tessera").update(readinesProbe={})),
    "builtin: bad probe port type": (
        check_builtin_kinds, lambda d: container(server(d), "tessera")["startupProbe"]["httpGet"].update(port=[8000])),
    "crd: pool targetPorts as numbers": (
        check_custom_resources, lambda d: find(d, "InferencePool")["spec"].update(targetPorts=[8000])),
    "crd: pool unknown field": (
        check_custom_resources, lambda d: find(d, "InferencePool")["spec"].update(extensionRef={"name": "x"})),
    "crd: objective priority string": (
        check_custom_resources, lambda d: find(d, "InferenceObjective")["spec"].update(priority="high")),
    "crd: route backendRef weight as a string": (
        check_custom_resources,
        lambda d: find(d, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0].update(weight="1")),
    "crd: gateway listener protocol missing": (
        check_custom_resources, lambda d: find(d, "Gateway")["spec"]["listeners"][0].pop("protocol")),
    "crd: epp ref without port": (
        check_custom_resources, lambda d: find(d, "InferencePool")["spec"]["endpointPickerRef"].pop("port")),
    "pool: selector label mismatch": (
        check_pool_selects_server,
        lambda d: find(d, "InferencePool")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "vllm"})),
    "pool: pod label dropped": (
        check_pool_selects_server, lambda d: _pod_labels(d).pop("app.kubernetes.io/component")),
    "pool: selector also matches the EPP": (
        check_pool_selects_server,
        lambda d: epp(d)["spec"]["template"]["metadata"]["labels"].update(_pod_labels(d))),
    "pool: target port is gRPC": (
        check_pool_target_port, lambda d: find(d, "InferencePool")["spec"].update(targetPorts=[{"number": 50051}])),
    "pool: gRPC app protocol": (
        check_pool_target_port, lambda d: find(d, "InferencePool")["spec"].update(appProtocol="kubernetes.io/h2c")),
    "pool: --http-port differs from the container port": (
        check_pool_target_port, lambda d: _set_arg(_args(d), "--http-port", "8080")),
    "epp ref: wrong service": (
        check_pool_names_epp, lambda d: find(d, "Service", "tessera-epp")["spec"].update(
            selector={"app.kubernetes.io/name": "nope"})),
    "epp ref: wrong port": (
        check_pool_names_epp,
        lambda d: find(d, "InferencePool")["spec"]["endpointPickerRef"]["port"].update(number=9003)),
    "epp ref: EPP watches the x-k8s.io pool group": (
        check_pool_names_epp,
        lambda d: _set_arg(container(epp(d), "epp")["args"], "--pool-group", "inference.networking.x-k8s.io")),
    "epp ref: EPP serves another pool": (
        check_pool_names_epp, lambda d: _set_arg(container(epp(d), "epp")["args"], "--pool-name", "other")),
    "probes: readiness on /healthz": (
        check_probes, lambda d: container(server(d), "tessera")["readinessProbe"]["httpGet"].update(path="/healthz")),
    "probes: liveness on the metrics port": (
        check_probes, lambda d: container(server(d), "tessera")["livenessProbe"]["httpGet"].update(port="metrics")),
    "probes: startup is gRPC": (
        check_probes, lambda d: container(server(d), "tessera").update(startupProbe={"grpc": {"port": 50051}})),
    "probes: liveness kills a draining pod": (
        check_probes, lambda d: container(server(d), "tessera")["livenessProbe"].update(failureThreshold=1)),
    "flags: misspelt server flag": (check_server_flags, lambda d: _args(d).append("--adapter-dir=/adapters")),
    "flags: bad size": (check_server_flags, lambda d: _set_arg(_args(d), "--memory-budget", "lots")),
    "flags: localhost": (check_server_flags, lambda d: _set_arg(_args(d), "--host", "127.0.0.1")),
    "flags: adapter root not mounted": (check_server_flags, lambda d: _set_arg(_args(d), "--adapter-root", "/data")),
    "flags: adapters read-write": (
        check_server_flags, lambda d: next(m for m in container(server(d), "tessera")["volumeMounts"]
                                           if m["name"] == "adapters").pop("readOnly")),
    "grace: shorter than the drain": (
        check_termination_grace,
        lambda d: server(d)["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30)),
    "grace: longer drain": (check_termination_grace, lambda d: _set_arg(_args(d), "--shutdown-grace", "60")),
    "gpu: no limit": (
        check_gpu, lambda d: container(server(d), "tessera")["resources"]["limits"].pop("nvidia.com/gpu")),
    "prometheus: wrong port": (
        check_prometheus, lambda d: server(d)["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "8000"})),
    "service: grpc to the http port": (
        check_service, lambda d: next(p for p in find(d, "Service", "tessera")["spec"]["ports"]
                                      if p["name"] == "grpc").update(targetPort="http")),
    "route: backend is the Service": (
        check_route, lambda d: find(d, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0].update(
            group="", kind="Service")),
    "route: backend names another pool": (
        check_route, lambda d: find(d, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0].update(name="vllm")),
    "route: parent gateway missing": (
        check_route, lambda d: find(d, "HTTPRoute")["spec"]["parentRefs"][0].update(name="other-gateway")),
    "objective: no priority": (check_objective, lambda d: find(d, "InferenceObjective")["spec"].pop("priority")),
    "objective: another pool": (
        check_objective, lambda d: find(d, "InferenceObjective")["spec"]["poolRef"].update(name="vllm")),
    "rbac: no inferencepools": (
        check_rbac, lambda d: find(d, "Role", "tessera-epp").update(rules=[
            r for r in find(d, "Role", "tessera-epp")["rules"] if "inferencepools" not in r["resources"]])),
    "rbac: EPP runs as another account": (
        check_rbac, lambda d: epp(d)["spec"]["template"]["spec"].update(serviceAccountName="default")),
    "epp config: lora-affinity-scorer not in the profile": (
        check_epp_config, lambda d: _epp_cfg_edit(d, lambda c: _drop_profile_plugin(c, "lora-affinity-scorer"))),
    "epp config: queue-scorer weight 0": (
        check_epp_config,
        lambda d: _epp_cfg_edit(d, lambda c: next(r for r in c["schedulingProfiles"][0]["plugins"]
                                                  if r["pluginRef"] == "queue-scorer").update(weight=0))),
    "epp config: kv-cache scorer misnamed": (
        check_epp_config, lambda d: _epp_cfg_edit(d, lambda c: next(
            p for p in c["plugins"] if p["type"] == "kv-cache-utilization-scorer").update(type="kv-cache-scorer"))),
    "epp config: no picker": (
        check_epp_config, lambda d: _epp_cfg_edit(d, lambda c: _drop_profile_plugin(c, "max-score-picker"))),
    "epp config: unknown top-level field": (
        check_epp_config, lambda d: _epp_cfg_edit(d, lambda c: c.update(scorers=[]))),
    "epp config: misspelt parameter": (
        check_epp_config, lambda d: _epp_cfg_edit(d, lambda c: _extractor(c)["parameters"].update(defaultEngines="x"))),
    "epp config: extractor as data source": (
        check_epp_config, lambda d: _epp_cfg_edit(d, lambda c: c["dataLayer"]["sources"][0].update(
            pluginRef="core-metrics-extractor"))),
    "metrics: name the server does not export": (
        check_epp_reads_server_metrics, lambda d: _epp_cfg_edit(d, lambda c: _extractor(c)["parameters"][
            "engineConfigs"][0].update(kvUsageSpec="vllm:gpu_kv_usage"))),
    "metrics: pods labelled for another engine": (
        check_epp_reads_server_metrics,
        lambda d: _pod_labels(d).update({"inference.networking.k8s.io/engine-type": "vllm"})),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES), ids=list(BREAKAGES))
def test_each_check_can_fail(breakage, docs):
    check, breaker = BREAKAGES[breakage]
    breaker(docs)
    with pytest.raises(AssertionError):
        check(docs)


def test_every_check_has_a_breakage():
    broken = {check for check, _ in BREAKAGES.values()}
    missing = [c.__name__ for c in CHECKS if c not in broken and c is not check_readme]
    assert not missing, f"checks never shown to fail: {missing}"


def test_readme_check_can_fail(tmp_path, docs):
    readme = tmp_path / "README.md"
    readme.write_text("kubectl apply -k deploy/kubernetes, --adapter-root, POST /v1/load_lora_adapter\n")
    with pytest.raises(AssertionError):
        check_readme(docs, readme)
