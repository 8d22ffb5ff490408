#!/usr/bin/env python3
"""Offline checks of the Helm chart, the alert rules and the Grafana dashboard.

Run through helm/tests/run, which installs the tools. Every check prints PASS, FAIL or
SKIP with what it looked at; the last line is "N passed, N failed". Rendered manifests
and logs go to helm/tests/.out/.

Checks, in order:
  lint       helm lint (strict) per value set; every finding is an error except the one
             that says the optional sub-charts are not vendored
  render     helm-python-sdk renders each value set in values/ (default, production,
             minimal, publickey, ha)
  invariants selectors, probes, security context, drain arithmetic, env sources of the
             rendered objects
  env        a value set's `# expect-env: NAME=value` / `# expect-no-env: NAME` lines
             hold for the resolved env of every gateway and worker container (ha:
             Redis Cluster seeds + SB_REDIS_CLUSTER, NATS cluster URLs, R3)
  k8s        kubernetes-validate --strict against the newest Kubernetes it bundles;
             ServiceMonitor/PrometheusRule/HTTPRoute are custom resources it has no
             schema for: skipped by name, their content is checked here instead
  schema     each values/bad-*.yaml fails with its expected message (schema or fail)
  subcharts  a temporary copy with stub nats/redis sub-charts: lint is clean, the
             conditions work, the connection env points at the sub-charts' services
  rules      promtool check rules; promtool test rules (tests/prometheus)
  dashboard  JSON parses (Grafana foundation SDK), uid, unique panel ids, every query
             passes promtool as a recording rule
  copies     dashboards/ and prometheus/ hold the same bytes as the chart's files
  config     the env and args of every rendered Deployment, run through
             `gateway --check-config` / `worker --check-config`; SB_* names must be
             the binary's own settings (from its --help)
  metrics    NATS, Redis, a stub LLM and team backend, a gateway, two workers and
             Prometheus (prometheus/prometheus.yml) on free loopback ports; traffic over
             WebSocket, a worker stopped mid-reply, NATS and Redis stopped, a SIGTERM
             drain; every dashboard query runs on that Prometheus, and every metric name
             in the dashboard and the rules must appear in the scraped /metrics, or be
             one of EVENT_ONLY, declared in shared/src/metrics.rs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import hmac
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / "helm"
CHART = HELM / "switchboard"
TESTS = HELM / "tests"
OUT = TESTS / ".out"
RULES = CHART / "files/prometheus/switchboard.rules.yml"
DASHBOARD = CHART / "files/grafana/switchboard.json"
COPIES = {
    DASHBOARD: ROOT / "dashboards/switchboard.json",
    RULES: ROOT / "prometheus/switchboard.rules.yml",
}
RELEASE, NAMESPACE = "sb", "chat"
# Newest Kubernetes whose schemas kubernetes-validate bundles (checked at run time).
K8S_VERSION_PREFERRED = "1.37.0"
# Kinds that are custom resources (no schema in kubernetes-validate).
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}
# The only lint finding accepted: the sub-charts are declared, not vendored.
EXPECTED_LINT = "chart directory is missing these dependencies: nats,redis"
# Metrics that only move on events this test does not cause reliably (a client too slow
# to read, a gap between nodes, a worker dying mid-request, NATS/Redis failing while a
# request is in flight). They must still be declared in shared/src/metrics.rs.
EVENT_ONLY = {
    "switchboard_slow_consumer_closes_total": "a client that stops reading while its outbound queue fills (needs megabytes of socket buffers filled first)",
    "switchboard_gap_repairs_total": "a channel message lost between two gateway nodes",
    "switchboard_epoch_restarts_total": "Redis losing channel positions while subscribers stay connected",
    "switchboard_worker_echoes_total": "a worker's NATS link dropping while a reply is in flight",
}
SECRET = "helm-tests-secret-0123456789abcdef-0123"


class Report:
    def __init__(self) -> None:
        self.results: list[tuple[str, str, str]] = []

    def add(self, status: str, name: str, detail: str = "") -> None:
        self.results.append((status, name, detail))
        line = f"{status:4} {name}"
        if detail:
            line += f": {detail}"
        print(line, flush=True)

    def ok(self, name: str, detail: str = "") -> None:
        self.add("PASS", name, detail)

    def fail(self, name: str, detail: str) -> None:
        self.add("FAIL", name, detail)

    def skip(self, name: str, detail: str) -> None:
        self.add("SKIP", name, detail)

    def check(self, cond: bool, name: str, detail_ok: str, detail_fail: str) -> bool:
        (self.ok if cond else self.fail)(name, detail_ok if cond else detail_fail)
        return cond


R = Report()


def section(title: str) -> None:
    print(f"\n--- {title}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --- value sets -------------------------------------------------------------------


def load_set(path: Path) -> dict:
    values = yaml.safe_load(path.read_text()) or {}
    # `# set-file: a.b=relative/path` lines inject file contents (helm --set-file).
    for m in re.finditer(r"^# set-file: ([\w.]+)=(\S+)$", path.read_text(), re.M):
        node = values
        keys = m.group(1).split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = (ROOT / m.group(2)).read_text()
    return values


def value_sets() -> dict[str, dict]:
    sets = {"default": {}}
    for p in sorted((TESTS / "values").glob("*.yaml")):
        if not p.name.startswith("bad-"):
            sets[p.stem] = load_set(p)
    return sets


# --- rendering --------------------------------------------------------------------


def render(chart_dir: Path, values: dict) -> list[tuple[str, dict]]:
    import helm_python as helm

    with helm.Chart.load(str(chart_dir)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for source, text in sorted(out.items()):
        if source.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((source, doc))
    return docs


def write_stream(path: Path, docs: list[tuple[str, dict]]) -> None:
    with path.open("w") as f:
        for source, doc in docs:
            f.write(f"---\n# Source: {source}\n")
            yaml.safe_dump(doc, f, sort_keys=False)


def by_kind(docs, kind):
    return [d for _, d in docs if d.get("kind") == kind]


def find(docs, kind, name):
    for _, d in docs:
        if d.get("kind") == kind and d["metadata"]["name"] == name:
            return d
    return None


def lint(chart_dir: Path, values: dict, name: str) -> None:
    import helm_python as helm

    report = helm.lint(str(chart_dir), values, strict=True, namespace=NAMESPACE)
    findings = [m["error"] for m in report.get("messages", [])]
    unexpected = [f for f in findings if f != EXPECTED_LINT]
    note = " (accepted: sub-charts declared, not vendored)" if EXPECTED_LINT in findings else ""
    R.check(not unexpected, f"lint {name}", f"no findings{note}", "; ".join(unexpected))


def invariants(name: str, docs, values: dict) -> None:
    problems = []
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    for d in deployments:
        dn = d["metadata"]["name"]
        pod = d["spec"]["template"]
        sel = d["spec"]["selector"]["matchLabels"]
        if not all(pod["metadata"]["labels"].get(k) == v for k, v in sel.items()):
            problems.append(f"{dn}: selector does not match pod labels")
        spec = pod["spec"]
        if spec.get("enableServiceLinks") is not False:
            problems.append(f"{dn}: enableServiceLinks must be false (service env vars named SB_* would be refused)")
        psc = spec.get("securityContext", {})
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if not (sc.get("readOnlyRootFilesystem") and (sc.get("runAsNonRoot") or psc.get("runAsNonRoot"))):
                problems.append(f"{dn}/{c['name']}: not read-only root / non-root")
            if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{dn}/{c['name']}: privilege escalation or capabilities not dropped")
            probes = {p: c.get(p, {}).get("httpGet", {}) for p in ("livenessProbe", "readinessProbe")}
            if probes["livenessProbe"].get("path") != "/healthz" or probes["readinessProbe"].get("path") != "/readyz":
                problems.append(f"{dn}/{c['name']}: liveness /healthz and readiness /readyz expected")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if "admin" not in ports or probes["readinessProbe"].get("port") != "admin":
                problems.append(f"{dn}/{c['name']}: probes must use the admin port")
            env_names = [e["name"] for e in c.get("env", [])]
            dup = {n for n in env_names if env_names.count(n) > 1}
            if dup:
                problems.append(f"{dn}/{c['name']}: duplicate env {sorted(dup)}")
            for e in c.get("env", []):
                if e["name"].startswith("SB_") and "value" in e and re.search(r"(?i)secret|key|token|password", e["name"]) and "FILE" not in e["name"]:
                    problems.append(f"{dn}/{c['name']}: {e['name']} given as a literal value (must come from a Secret)")
        component = pod["metadata"]["labels"].get("app.kubernetes.io/component")
        grace = spec["terminationGracePeriodSeconds"]
        cm = find(docs, "ConfigMap", dn)
        if component == "gateway":
            drain = int(cm["data"].get("SB_DRAIN_SECS", 10))
            prestop = spec["containers"][0].get("lifecycle", {}).get("preStop", {})
            sleep = prestop.get("sleep", {}).get("seconds") or int((prestop.get("exec", {}).get("command") or [0, 0])[-1])
            if grace < sleep + drain + 13:
                problems.append(f"{dn}: terminationGracePeriodSeconds {grace} < preStop {sleep} + drain {drain} + 13")
        if component == "worker":
            g = int(cm["data"].get("SB_SHUTDOWN_GRACE_SECS", 25))
            if grace < g + 15:
                problems.append(f"{dn}: terminationGracePeriodSeconds {grace} < shutdown grace {g} + 15")
        # A Service must select these pods on every port it names.
    for s in services:
        sel = s["spec"].get("selector", {})
        targets = [d for d in deployments if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if len(targets) != 1:
            problems.append(f"Service {s['metadata']['name']} selects {len(targets)} Deployments")
            continue
        names = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            if p["targetPort"] not in names:
                problems.append(f"Service {s['metadata']['name']}: targetPort {p['targetPort']} not a container port")
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
        for o in by_kind(docs, kind):
            if kind == "PodDisruptionBudget":
                sel = o["spec"]["selector"]["matchLabels"]
                ok = any(all(d["spec"]["selector"]["matchLabels"].get(k) == v for k, v in sel.items()) for d in deployments)
            else:
                ok = find(docs, "Deployment", o["spec"]["scaleTargetRef"]["name"]) is not None
            if not ok:
                problems.append(f"{kind} {o['metadata']['name']} targets nothing")
    for ing in by_kind(docs, "Ingress"):
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                if not find(docs, "Service", p["backend"]["service"]["name"]):
                    problems.append(f"Ingress backend {p['backend']['service']['name']} missing")
    for sm in by_kind(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        jobs = sorted(s["metadata"]["labels"].get(sm["spec"]["jobLabel"], "") for s in matched)
        want = ["switchboard-gateway", "switchboard-worker"] if values.get("worker", {}).get("enabled", True) else ["switchboard-gateway"]
        if jobs != want:
            problems.append(f"ServiceMonitor selects jobs {jobs}, expected {want}")
        for s in matched:
            if not any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"]):
                problems.append(f"ServiceMonitor port not on {s['metadata']['name']}")
    for pr in by_kind(docs, "PrometheusRule"):
        path = OUT / f"{name}.prometheusrule.yml"
        path.write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}))
        res = run(["promtool", "check", "rules", str(path)])
        if res.returncode != 0:
            problems.append(f"PrometheusRule groups fail promtool: {res.stdout} {res.stderr}")
    for cm in by_kind(docs, "ConfigMap"):
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            data = json.loads(next(iter(cm["data"].values())))
            if data.get("uid") != json.loads(DASHBOARD.read_text())["uid"]:
                problems.append("dashboard ConfigMap does not hold the dashboard")
    for hr in by_kind(docs, "HTTPRoute"):
        for rule in hr["spec"]["rules"]:
            for b in rule["backendRefs"]:
                if not find(docs, "Service", b["name"]):
                    problems.append(f"HTTPRoute backend {b['name']} missing")
    R.check(not problems, f"invariants {name}", f"{len(docs)} objects consistent", "; ".join(problems))


def admin_exposure(name: str, docs) -> None:
    """The admin port (/healthz, /readyz, /metrics, unauthenticated) is reachable only
    where probes and Prometheus need it: a pod port without hostPort, listed only on
    headless cluster-internal Services, never on a Service that is exposed (type
    LoadBalancer/NodePort) or that an Ingress or HTTPRoute routes to."""
    problems = []
    admin_numbers = set()
    for d in by_kind(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            for p in c.get("ports", []):
                if p["name"] == "admin":
                    admin_numbers.add(p["containerPort"])
                    if p.get("hostPort"):
                        problems.append(f"{d['metadata']['name']}/{c['name']}: admin port has a hostPort")
    routed = set()
    for ing in by_kind(docs, "Ingress"):
        for rule in ing["spec"].get("rules", []):
            for p in rule["http"]["paths"]:
                routed.add(p["backend"]["service"]["name"])
        default = ing["spec"].get("defaultBackend", {}).get("service", {}).get("name")
        if default:
            routed.add(default)
    for hr in by_kind(docs, "HTTPRoute"):
        for rule in hr["spec"]["rules"]:
            for b in rule["backendRefs"]:
                routed.add(b["name"])
    for svc in by_kind(docs, "Service"):
        sn = svc["metadata"]["name"]
        spec = svc["spec"]
        admin_ports = [p for p in spec["ports"] if p.get("targetPort") == "admin" or p.get("targetPort") in admin_numbers]
        if not admin_ports:
            continue
        if spec.get("type", "ClusterIP") != "ClusterIP" or spec.get("clusterIP") != "None":
            problems.append(f"Service {sn} carries the admin port but is not headless ClusterIP")
        if len(admin_ports) != len(spec["ports"]):
            problems.append(f"Service {sn} mixes the admin port with public ports")
        if sn in routed:
            problems.append(f"Service {sn} carries the admin port and is routed by an Ingress/HTTPRoute")
    for cm in by_kind(docs, "ConfigMap"):
        listen = cm.get("data", {}).get("SB_ADMIN_LISTEN")
        if listen and int(listen.rsplit(":", 1)[1]) not in admin_numbers:
            problems.append(f"ConfigMap {cm['metadata']['name']}: SB_ADMIN_LISTEN {listen} is not the admin container port")
    R.check(not problems, f"admin port private {name}",
            f"admin port {sorted(admin_numbers)} only on headless internal Services", "; ".join(problems))


def expected_env(name: str) -> tuple[dict[str, str], list[str]]:
    """`# expect-env: NAME=value` and `# expect-no-env: NAME` lines of a value set."""
    path = TESTS / "values" / f"{name}.yaml"
    if not path.exists():
        return {}, []
    text = path.read_text()
    want = dict(m.split("=", 1) for m in re.findall(r"^# expect-env: (\S+=.*)$", text, re.M))
    absent = re.findall(r"^# expect-no-env: (\S+)$", text, re.M)
    return want, absent


def env_expectations(name: str, docs) -> None:
    want, absent = expected_env(name)
    if not want and not absent:
        return
    problems, seen = [], 0
    for d in by_kind(docs, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c["name"] not in ("gateway", "worker"):
                continue
            seen += 1
            tmp = Path(tempfile.mkdtemp(prefix="sb-env-"))
            try:
                env, _ = resolve_env(docs, c, pod, tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for k, v in want.items():
                if env.get(k) != v:
                    problems.append(f"{c['name']}: {k}={env.get(k)!r}, expected {v!r}")
            for k in absent:
                if k in env:
                    problems.append(f"{c['name']}: {k}={env[k]!r} set, expected absent")
    R.check(not problems and seen > 0, f"env {name}",
            f"{len(want)} expected, {len(absent)} absent, in {seen} containers", "; ".join(problems) or "no containers")


def k8s_version() -> str:
    import kubernetes_validate.utils as kv

    versions = kv.all_versions()
    return K8S_VERSION_PREFERRED if K8S_VERSION_PREFERRED in versions else versions[-1]


def k8s_validate(name: str, docs) -> None:
    core = [(s, d) for s, d in docs if d["kind"] not in CUSTOM_KINDS]
    custom = sorted({d["kind"] for _, d in docs if d["kind"] in CUSTOM_KINDS})
    path = OUT / f"{name}.core.yaml"
    write_stream(path, core)
    version = k8s_version()
    res = run([str(HELM / ".venv/bin/kubernetes-validate"), "--strict", "-k", version, str(path)])
    detail = f"{len(core)} objects valid for Kubernetes {version}"
    if custom:
        detail += f"; custom resources not validated (no schema bundled): {', '.join(custom)}"
    R.check(res.returncode == 0, f"kubernetes-validate {name}", detail, (res.stdout + res.stderr).strip()[-1500:])


def bad_values() -> None:
    import helm_python as helm

    for path in sorted((TESTS / "values").glob("bad-*.yaml")):
        expects = re.findall(r"^# expect: (.+)$", path.read_text(), re.M)
        values = load_set(path)
        try:
            with helm.Chart.load(str(CHART)) as chart:
                chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            R.fail(f"bad values {path.name}", "rendered without error")
        except helm.HelmError as e:
            msg = str(e)
            missing = [x for x in expects if x not in msg]
            first = next((l.strip() for l in msg.splitlines() if l.strip()
                          and not l.startswith(("values don't", "switchboard:", "execution error"))), msg)
            R.check(bool(expects) and not missing, f"bad values {path.name}",
                    f"{type(e).__name__}: {first[:160]}", f"message lacks {missing}: {msg[:600]}")


# --- sub-chart wiring with stubs ----------------------------------------------------


def stub_subcharts() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sb-subcharts-"))
    try:
        chart = tmp / "switchboard"
        shutil.copytree(CHART, chart)
        meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
        versions = {"nats": "1.3.0", "redis": "21.0.0"}
        for dep in meta["dependencies"]:
            d = chart / "charts" / dep["name"]
            (d / "templates").mkdir(parents=True)
            (d / "Chart.yaml").write_text(yaml.safe_dump({"apiVersion": "v2", "name": dep["name"], "version": versions[dep["name"]],
                                                          "description": "stub for the wiring test", "icon": meta["icon"]}))
            (d / "values.yaml").write_text("{}\n")
        # The objects our env refers to, named the way the real charts name them.
        (chart / "charts/nats/templates/service.yaml").write_text(
            'apiVersion: v1\nkind: Service\nmetadata:\n  name: {{ printf "%s-nats" .Release.Name }}\n'
            'spec:\n  ports:\n    - {name: nats, port: 4222}\n')
        (chart / "charts/redis/templates/secret.yaml").write_text(
            'apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ printf "%s-redis" .Release.Name }}\n'
            'data:\n  redis-password: {{ "stubpassword" | b64enc }}\n')
        (chart / "charts/redis/templates/service.yaml").write_text(
            'apiVersion: v1\nkind: Service\nmetadata:\n  name: {{ printf "%s-redis-master" .Release.Name }}\n'
            'spec:\n  ports:\n    - {name: tcp-redis, port: 6379}\n')
        values = {"nats": {"enabled": True}, "redis": {"enabled": True}}
        import helm_python as helm

        report = helm.lint(str(chart), values, strict=True, namespace=NAMESPACE)
        findings = [m["error"] for m in report.get("messages", [])]
        R.check(not findings, "subcharts lint", "no findings with the sub-charts present", "; ".join(findings))
        off = render(chart, {})
        R.check(not any(d["metadata"]["name"] in (f"{RELEASE}-nats", f"{RELEASE}-redis-master") for _, d in off),
                "subcharts off by default", "no sub-chart objects rendered", "sub-chart objects rendered while disabled")
        docs = render(chart, values)
        write_stream(OUT / "subcharts.yaml", docs)
        problems = []
        for dep in ("gateway", "worker"):
            d = find(docs, "Deployment", f"{RELEASE}-switchboard-{dep}")
            env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            nats = env.get("SB_NATS_URL", {}).get("value", "")
            redis = env.get("SB_REDIS_URL", {}).get("value", "")
            host = re.match(r"nats://([^:]+):4222$", nats)
            if not host or not find(docs, "Service", host.group(1)):
                problems.append(f"{dep}: SB_NATS_URL {nats!r} does not name the NATS sub-chart Service")
            m = re.match(r"redis://:\$\(REDIS_PASSWORD\)@([^:]+):6379$", redis)
            if not m or not find(docs, "Service", m.group(1)):
                problems.append(f"{dep}: SB_REDIS_URL {redis!r} does not name the Redis sub-chart Service")
            pw = env.get("REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
            sec = find(docs, "Secret", pw.get("name", ""))
            if not sec or pw.get("key") not in sec.get("data", {}):
                problems.append(f"{dep}: REDIS_PASSWORD does not read the Redis sub-chart Secret")
            if list(env).index("REDIS_PASSWORD") > list(env).index("SB_REDIS_URL"):
                problems.append(f"{dep}: REDIS_PASSWORD must precede SB_REDIS_URL for $(...) expansion")
        cm = find(docs, "ConfigMap", f"{RELEASE}-switchboard-gateway")
        if cm["data"].get("SB_JETSTREAM_REPLICAS") != "3":
            problems.append("SB_JETSTREAM_REPLICAS should default to 3 with the bundled NATS cluster")
        R.check(not problems, "subcharts wiring", "SB_NATS_URL / SB_REDIS_URL point at the sub-charts' Service and Secret", "; ".join(problems))
        return docs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- Prometheus rules and dashboard ------------------------------------------------


def rules_checks() -> None:
    res = run(["promtool", "check", "rules", str(RULES)])
    R.check(res.returncode == 0, "promtool check rules", res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "", res.stdout + res.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="sb-rules-"))
    try:
        rules = yaml.safe_load(RULES.read_text())
        full = copy.deepcopy(rules)
        for g in rules["groups"]:
            for r in g["rules"]:
                r["annotations"] = {"summary": r.get("annotations", {}).get("summary", "")}
        (tmp / "switchboard.rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        shutil.copy(TESTS / "prometheus/alerts.test.yml", tmp / "alerts.test.yml")
        res = run(["promtool", "test", "rules", "alerts.test.yml"], cwd=tmp)
        tested = sorted(set(re.findall(r"alertname: (\w+)", (TESTS / "prometheus/alerts.test.yml").read_text())))
        R.check(res.returncode == 0, "promtool test rules", f"{len(tested)} alerts unit-tested: {', '.join(tested)}", (res.stdout + res.stderr)[-2000:])
        missing = {"SwitchboardGatewayDown", "SwitchboardChatErrorRatioHigh"} - set(tested)
        R.check(not missing, "alert tests cover gateway-down and chat-error-ratio", "both present", f"missing {missing}")
        alerts = [r for g in full["groups"] for r in g["rules"]]
        lacking = [r["alert"] for r in alerts
                   if not {"summary", "description", "runbook"} <= set(r.get("annotations", {})) or "severity" not in r.get("labels", {})]
        R.check(not lacking, "alert annotations", f"{len(alerts)} alerts have severity, summary, description and runbook notes", f"incomplete: {lacking}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    exprs = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    exprs.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str):
            m = re.match(r"label_values\((.+),\s*\w+\)$", q)
            exprs.append((f"variable {v['name']}", m.group(1) if m else q))
    return exprs


def substitute(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def dashboard_checks() -> list[tuple[str, str]]:
    raw = DASHBOARD.read_text()
    dash = json.loads(raw)
    problems = []
    try:
        from grafana_foundation_sdk.models.dashboard import Dashboard

        parsed = Dashboard.from_json(dash)
        if parsed.uid != dash["uid"]:
            problems.append("foundation SDK lost the uid")
    except Exception as e:  # noqa: BLE001 - any parse failure is the finding
        problems.append(f"foundation SDK cannot parse it: {e}")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash.get("uid", "")):
        problems.append(f"uid {dash.get('uid')!r} missing or not a valid Grafana uid")
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p.get("id"))
            if p.get("type") != "row":
                if "datasource" not in p:
                    problems.append(f"panel {p.get('title')}: no datasource")
                if not p.get("targets"):
                    problems.append(f"panel {p.get('title')}: no query")
                for t in p.get("targets", []):
                    if not t.get("refId"):
                        problems.append(f"panel {p.get('title')}: target without refId")
            walk(p.get("panels", []))

    walk(dash["panels"])
    cells = {}
    for p in dash["panels"]:
        g = p.get("gridPos", {})
        if g.get("x", 0) + g.get("w", 0) > 24:
            problems.append(f"panel {p.get('title')} is wider than the 24-column grid")
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in cells:
                    problems.append(f"panels {cells[(x, y)]!r} and {p.get('title')!r} overlap")
                cells[(x, y)] = p.get("title")
    dup = sorted({i for i in ids if ids.count(i) > 1 or i is None}, key=str)
    if dup:
        problems.append(f"duplicate or missing panel ids {dup}")
    problems = list(dict.fromkeys(problems))
    R.check(not problems, "dashboard structure", f"uid {dash['uid']}, {len(ids)} panels with unique ids, no overlaps", "; ".join(problems[:8]))
    exprs = dashboard_exprs(dash)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(exprs)]}]}
    path = OUT / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    res = run(["promtool", "check", "rules", str(path)])
    R.check(res.returncode == 0, "dashboard queries parse (promtool)", f"{len(exprs)} expressions", (res.stdout + res.stderr)[-1500:])
    return exprs


def copies_check() -> None:
    stale = [f"{dst.relative_to(ROOT)} differs from {src.relative_to(ROOT)} (cp {src.relative_to(ROOT)} {dst.relative_to(ROOT)})"
             for src, dst in COPIES.items() if not dst.exists() or dst.read_bytes() != src.read_bytes()]
    R.check(not stale, "copies in sync", "dashboards/switchboard.json and prometheus/switchboard.rules.yml match the chart", "; ".join(stale))


def metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(re.findall(r"\b(switchboard_[a-z0-9_]+)\b", no_strings))


# --- check-config of the rendered env ---------------------------------------------


def binary_env_names(binary: Path) -> set[str]:
    res = run([str(binary), "--help"])
    names = set(re.findall(r"env: (SB_[A-Z0-9_]+)", res.stdout))
    names.add("SB_LOG")  # read by the tracing setup of both binaries, not a flag
    return names


DUMMY_SECRET_VALUES = {
    "jwt-secret": SECRET,
    "api-key": "dummy-api-key-0123456789",
    "llm-api-key": "sk-dummy",
    "backend-token": "dummy-backend-token",
    "nats-url": "nats://nats.example:4222",
    "redis-url": "redis://:pw@redis.example:6379",
    "redis-password": "stubpassword",
}


def resolve_env(docs, container: dict, pod_spec: dict, tmp: Path) -> tuple[dict, list[str]]:
    """The environment Kubernetes would give the container; notes what was stubbed."""
    notes: list[str] = []

    def configmap(name):
        cm = find(docs, "ConfigMap", name)
        return None if cm is None else dict(cm.get("data", {}))

    def secret(name):
        s = find(docs, "Secret", name)
        if s is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
        data.update(s.get("stringData", {}))
        return data

    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            data = configmap(src["configMapRef"]["name"])
            if data is None:
                raise AssertionError(f"envFrom ConfigMap {src['configMapRef']['name']} not rendered")
            env.update({src.get("prefix", "") + k: v for k, v in data.items()})
        elif "secretRef" in src:
            data = secret(src["secretRef"]["name"]) or {}
            env.update({src.get("prefix", "") + k: v for k, v in data.items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
            continue
        vf = e["valueFrom"]
        if "secretKeyRef" in vf:
            ref = vf["secretKeyRef"]
            data = secret(ref["name"])
            if data is None:
                notes.append(f"{e['name']} from existing Secret {ref['name']}/{ref['key']} (stub value)")
                key = next((k for k, v in DUMMY_SECRET_VALUES.items() if ref["key"].endswith(k)), None)
                env[e["name"]] = DUMMY_SECRET_VALUES.get(key, "dummy-value-0123456789abcdef0123456789")
            elif ref["key"] in data:
                env[e["name"]] = data[ref["key"]]
            elif not ref.get("optional"):
                raise AssertionError(f"{e['name']}: key {ref['key']} not in Secret {ref['name']}")
        elif "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            data = configmap(ref["name"]) or {}
            if ref["key"] in data:
                env[e["name"]] = data[ref["key"]]
        elif "fieldRef" in vf:
            env[e["name"]] = {"metadata.name": "switchboard-pod-0", "metadata.namespace": NAMESPACE}.get(vf["fieldRef"]["fieldPath"], "10.0.0.1")
    # Files mounted from ConfigMaps/Secrets: materialise them and point the env at them.
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        src = vol.get("configMap") or vol.get("secret")
        if not src:
            continue
        ref_name = src.get("name") or src.get("secretName")
        data = (configmap(ref_name) if "configMap" in vol else secret(ref_name))
        local = tmp / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        for item in src.get("items", [{"key": k, "path": k} for k in (data or {})]):
            if data is not None and item["key"] in data:
                content = data[item["key"]]
            else:
                stub = {"public.pem": "testkit/keys/rsa_public.pem", "jwks.json": "testkit/keys/jwks.json"}.get(item["path"])
                if not stub:
                    raise AssertionError(f"mounted {ref_name}/{item['key']} not rendered and no stub for it")
                notes.append(f"{m['mountPath']}/{item['path']} from existing {ref_name} (stub: {stub})")
                content = (ROOT / stub).read_text()
            (local / item["path"]).write_text(content)
        for k, v in list(env.items()):
            if v.startswith(m["mountPath"].rstrip("/") + "/"):
                env[k] = str(local) + v[len(m["mountPath"].rstrip("/")):]
    return env, notes


def check_config(name: str, docs, binaries: dict[str, Path], known: dict[str, set[str]]) -> None:
    for d in by_kind(docs, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            binary = binaries.get(c["name"])
            if binary is None:
                continue
            label = f"check-config {name} {c['name']}"
            tmp = Path(tempfile.mkdtemp(prefix="sb-cc-"))
            try:
                env, notes = resolve_env(docs, c, pod, tmp)
                foreign = sorted(k for k in env if k.startswith("SB_") and k not in known[c["name"]])
                if foreign:
                    R.fail(label, f"SB_* variables that {c['name']} does not read: {foreign}")
                    continue
                argv = [str(binary)] + list(c.get("command", [])[1:]) + list(c.get("args", [])) + ["--check-config"]
                clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), **env}
                res = subprocess.run(argv, env=clean, capture_output=True, text=True, timeout=30)
                detail = f"exit 0 with {len([k for k in env if k.startswith('SB_')])} SB_* variables"
                if notes:
                    detail += f" ({len(notes)} from existing objects stubbed)"
                R.check(res.returncode == 0 and res.stdout.startswith("config ok"), label, detail,
                        f"exit {res.returncode}: {(res.stderr or res.stdout).strip()[:400]}")
            except AssertionError as e:
                R.fail(label, str(e))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


# SB_* settings the chart sets itself rather than through gateway.config / worker.config.
CHART_MANAGED = {
    "gateway": {"SB_CONFIG", "SB_LISTEN", "SB_ADMIN_LISTEN", "SB_NODE_ID", "SB_NATS_URL", "SB_REDIS_URL", "SB_REDIS_CLUSTER", "SB_PREFIX",
                "SB_LOG_FORMAT", "SB_LOG", "SB_JETSTREAM_REPLICAS", "SB_JWT_SECRET", "SB_JWT_PUBLIC_KEY_FILE",
                "SB_JWT_JWKS_FILE", "SB_JWT_ALGORITHM", "SB_JWT_AUDIENCE", "SB_JWT_ISSUER", "SB_JWT_LEEWAY_SECS", "SB_JWT_MAX_LIFETIME_SECS", "SB_API_KEY"},
    "worker": {"SB_CONFIG", "SB_ADMIN_LISTEN", "SB_NODE_ID", "SB_NATS_URL", "SB_REDIS_URL", "SB_REDIS_CLUSTER", "SB_PREFIX", "SB_LOG_FORMAT",
               "SB_LOG", "SB_JETSTREAM_REPLICAS", "SB_LLM_API_KEY", "SB_BACKEND_TOKEN"},
}


def schema_coverage(known: dict[str, set[str]]) -> None:
    """Every setting a binary reads is reachable through the chart, and nothing more."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for comp in ("gateway", "worker"):
        props = schema["properties"][comp]["properties"]
        config_keys = set(props["config"]["properties"])
        as_env = {"SB_" + re.sub(r"(?<!^)(?=[A-Z])", "_", k).upper() for k in config_keys}
        reachable = as_env | CHART_MANAGED[comp]
        problems = []
        if known[comp] - reachable:
            problems.append(f"{comp} settings the chart cannot set (add them to {comp}.config in values.yaml and the schema): {sorted(known[comp] - reachable)}")
        if as_env - known[comp]:
            problems.append(f"{comp}.config keys that are not {comp} settings: {sorted(as_env - known[comp])}")
        if set(values[comp]["config"]) != config_keys:
            problems.append(f"values.yaml {comp}.config and the schema list different keys: {sorted(set(values[comp]['config']) ^ config_keys)}")
        enum = set(props["extraEnv"]["items"]["then"]["properties"]["name"]["enum"])
        if enum != known[comp]:
            problems.append(f"schema {comp}.extraEnv names differ from the binary's: {sorted(enum ^ known[comp])}")
        R.check(not problems, f"chart covers every {comp} setting",
                f"{len(known[comp])} SB_* settings of `{comp} --help`: {len(as_env)} via {comp}.config, the rest set by the chart",
                "; ".join(problems))


def check_config_refuses(binaries: dict[str, Path]) -> None:
    """The harness itself: a misspelt variable must be refused by name, with exit 64."""
    res = subprocess.run([str(binaries["gateway"]), "--check-config"], capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", ""), "SB_JWT_SECRET": SECRET, "SB_DRAIN_SEC": "10"})
    R.check(res.returncode == 64 and "SB_DRAIN_SEC" in res.stderr, "check-config refuses a typo",
            "gateway exits 64 naming SB_DRAIN_SEC", f"exit {res.returncode}: {res.stderr.strip()[:300]}")


# --- live metrics -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20, want: int = 200) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == want:
                    return True
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    return False


def wait_port(port: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def exposition_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def mint(user: str, ttl: int = 3600) -> str:
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}).encode())
    sig = b64(hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


class StubServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a worker hanging up mid-stream is expected
        pass


class StubHandler(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible streaming LLM (/v1/chat/completions) and a team backend
    (/api/users/<id>/teams|tasks)."""

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        m = re.match(r"^/api/users/[^/]+/(teams|tasks)$", self.path)
        body = json.dumps([{"id": "t1", "name": "Team one"}] if m and m.group(1) == "teams" else []).encode()
        self.send_response(200 if m else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        last = (req.get("messages") or [{}])[-1].get("content", "")
        if "fail" in last:
            body = b'{"error": {"message": "stub failure", "type": "server_error"}}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        pieces = ["Hello", " from", " the stub."]
        if "slow" in last:  # a long reply, for the shutdown hand-back test
            pieces = [f" part {i}" for i in range(12)]
        for piece in pieces:
            chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.25 if "slow" in last else 0.02)
        usage = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()


async def drive_traffic(ws_url: str) -> list[str]:
    import websockets

    log: list[str] = []

    async def recv_until(ws, pred, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(0.1, deadline - time.time())))
            if pred(frame):
                return frame
        raise TimeoutError("frame not seen")

    def proto(token):
        return ["switchboard.v1", f"bearer.{token}"]

    async with websockets.connect(ws_url, subprotocols=proto(mint("helm-u1"))) as a:
        auth = await recv_until(a, lambda f: f["type"] == "authenticated")
        log.append(f"authenticated on {auth.get('node')} (degraded={auth.get('degraded')}, teams={len(auth.get('teams', []))})")
        await a.send(json.dumps({"type": "subscribe", "channel": "lobby:room", "id": "s1"}))
        await recv_until(a, lambda f: f.get("id") == "s1")
        await a.send(json.dumps({"type": "publish", "channel": "lobby:room", "data": {"hello": 1}, "id": "p1"}))
        await recv_until(a, lambda f: f["type"] == "message")
        await a.send(json.dumps({"type": "subscribe", "channel": "lobby:room", "since": 0, "id": "s2"}))
        await recv_until(a, lambda f: f.get("id") == "s2" and f["type"] == "subscribed")
        log.append("channel publish delivered, recovery subscribe answered")
        await a.send(json.dumps({"type": "chat.send", "message": "hello", "id": "c1"}))
        done = await recv_until(a, lambda f: f["type"] in ("chat.complete", "chat.error"), timeout=20)
        log.append(f"chat.send -> {done['type']}")
        await a.send(json.dumps({"type": "chat.send", "message": "please fail", "id": "c2"}))
        err = await recv_until(a, lambda f: f["type"] in ("chat.complete", "chat.error"), timeout=20)
        log.append(f"chat.send (LLM 500) -> {err['type']}")
        await a.send(json.dumps({"type": "ping", "id": "g1"}))
        await recv_until(a, lambda f: f.get("id") == "g1")
    # A bad token: one error frame, close 4503.
    try:
        async with websockets.connect(ws_url, subprotocols=proto("not.a.jwt")) as b:
            await recv_until(b, lambda f: f["type"] == "error", timeout=5)
            await asyncio.wait_for(b.wait_closed(), 5)
        log.append(f"bad token closed {b.close_code}")
    except Exception as e:  # noqa: BLE001 - the close is the point
        log.append(f"bad token: {type(e).__name__}")
    # Pings beyond the burst: refused as RATE_LIMITED (and closed 4029 if it goes on).
    async with websockets.connect(ws_url, subprotocols=proto(mint("helm-u2"))) as c:
        await recv_until(c, lambda f: f["type"] == "authenticated")
        limited = False
        try:
            for i in range(50):
                await c.send(json.dumps({"type": "ping"}))
            await recv_until(c, lambda f: f.get("code") == "RATE_LIMITED", timeout=5)
            limited = True
        except websockets.ConnectionClosed as e:
            limited = e.rcvd is not None and e.rcvd.code == 4029
        log.append("pings beyond the burst rate limited" if limited else "pings beyond the burst: no RATE_LIMITED seen")
    return log


async def connect_expect_error(ws_url: str) -> str:
    import websockets

    try:
        async with websockets.connect(ws_url, subprotocols=["switchboard.v1", f"bearer.{mint('helm-u3')}"], open_timeout=5) as d:
            frame = json.loads(await asyncio.wait_for(d.recv(), 10))
            return frame.get("code") or frame.get("type")
    except Exception as e:  # noqa: BLE001
        return type(e).__name__


def prometheus_queries(port: int, exprs: list[tuple[str, str]]) -> tuple[str, str, str]:
    """Runs every dashboard query on a real Prometheus that scraped the live processes."""
    name = "dashboard queries on Prometheus"
    if not wait_http(f"http://127.0.0.1:{port}/-/ready", 15):
        return ("FAIL", name, "prometheus did not become ready (see .out/live/prometheus.log)")
    # Two scrapes after the traffic, so rates have samples on both sides.
    time.sleep(2.5)

    def query(q):
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    up = query('up{job=~"switchboard-gateway|switchboard-worker"} == 1')["data"]["result"]
    jobs = sorted({(x["metric"]["job"], "pod" in x["metric"]) for x in up})
    if jobs != [("switchboard-gateway", True), ("switchboard-worker", True)]:
        return ("FAIL", name, f"targets up with a pod label: {jobs}")
    errors, with_data = [], 0
    for title, e in exprs:
        q = e.replace("$__rate_interval", "30s").replace("$__interval", "1s")
        q = re.sub(r"\$\{?\w+\}?", ".*", q)
        try:
            res = query(q)
        except urllib.error.HTTPError as err:
            errors.append(f"{title}: {err.read().decode()[:200]}")
            continue
        if res.get("status") != "success":
            errors.append(f"{title}: {res}")
        elif res["data"]["result"]:
            with_data += 1
    rules = query("ALERTS")  # the rule file loaded and evaluates
    loaded = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10).read())
    n_rules = sum(len(g["rules"]) for g in loaded["data"]["groups"])
    health = [r["name"] for g in loaded["data"]["groups"] for r in g["rules"] if r.get("health") == "err"]
    if errors or health or not n_rules or rules.get("status") != "success":
        return ("FAIL", name, f"query errors {errors[:5]}; rules erroring {health}; rules loaded {n_rules}")
    return ("PASS", name, f"{len(exprs)} queries ran ({with_data} returned series); job and pod labels from prometheus/prometheus.yml; {n_rules} alert rules loaded and evaluating without errors")


async def handback(ws_url, workers, wk_ports) -> str:
    """A reply is streaming when its worker gets SIGTERM with a 1 s grace: the worker
    hands it back (nak) and the other worker answers it as a redelivery."""
    import websockets

    async with websockets.connect(ws_url, subprotocols=["switchboard.v1", f"bearer.{mint('helm-u4')}"]) as e:
        first = json.loads(await asyncio.wait_for(e.recv(), 10))
        assert first["type"] == "authenticated", first
        await e.send(json.dumps({"type": "chat.send", "message": "a slow one", "id": "slow"}))
        busy = None
        deadline = time.time() + 10
        while busy is None and time.time() < deadline:
            for i, port in enumerate(wk_ports):
                text = await asyncio.to_thread(scrape, port)
                if re.search(r"^switchboard_worker_requests_in_flight 1$", text, re.M):
                    busy = i
            await asyncio.sleep(0.1)
        if busy is None:
            return "no worker picked the request up"
        workers[busy].send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline:
            f = json.loads(await asyncio.wait_for(e.recv(), max(0.1, deadline - time.time())))
            if f["type"] in ("chat.complete", "chat.error"):
                await asyncio.to_thread(workers[busy].wait, 10)
                return f"worker {busy + 1} stopped mid-stream; {f['type']} came from the other worker"
        return "no reply after the hand-back"


async def late_phases(ws_url, redis, nats, gateway, gw_admin, wk_admin, seen) -> dict:
    import websockets

    out = {"unavailable": None, "drain": [], "draining_seen": False}
    held = await websockets.connect(ws_url, subprotocols=["switchboard.v1", f"bearer.{mint('helm-held')}"])
    first = json.loads(await asyncio.wait_for(held.recv(), 10))
    assert first["type"] == "authenticated", first

    async def gather_names(port, who):
        text = await asyncio.to_thread(scrape, port)
        seen[who] |= exposition_names(text)
        return text

    # NATS first: a chat request on the held connection cannot be stored.
    nats.send_signal(signal.SIGTERM)
    await asyncio.to_thread(nats.wait, 10)
    await held.send(json.dumps({"type": "chat.send", "message": "while NATS is down", "id": "down"}))
    try:
        deadline = time.time() + 12
        while time.time() < deadline:
            f = json.loads(await asyncio.wait_for(held.recv(), max(0.1, deadline - time.time())))
            if f.get("id") == "down":
                out["chat_without_nats"] = f.get("code") or f.get("type")
                break
    except asyncio.TimeoutError:
        out["chat_without_nats"] = "no answer"
    deadline = time.time() + 12
    while time.time() < deadline:
        await gather_names(wk_admin, "worker")
        await gather_names(gw_admin, "gateway")
        if "switchboard_worker_consumer_errors_total" in seen["worker"]:
            break
        await asyncio.sleep(0.5)
    # Then Redis: a new connection cannot authenticate.
    redis.send_signal(signal.SIGTERM)
    await asyncio.to_thread(redis.wait, 10)
    out["unavailable"] = await connect_expect_error(ws_url)
    await asyncio.sleep(1.5)
    await gather_names(gw_admin, "gateway")
    await gather_names(wk_admin, "worker")

    gateway.send_signal(signal.SIGTERM)
    out["sigterm_at"] = time.monotonic()
    deadline = time.time() + 5
    while time.time() < deadline and not out["draining_seen"]:
        try:
            text = await gather_names(gw_admin, "gateway")
        except Exception:  # noqa: BLE001 - gone already
            break
        out["draining_seen"] = bool(re.search(r"^switchboard_draining(\{[^}]*\})? 1$", text, re.M))
        await asyncio.sleep(0.05)
    try:
        while True:
            frame = json.loads(await asyncio.wait_for(held.recv(), 10))
            if frame.get("type") == "reconnect":
                out["drain"].append("reconnect")
    except websockets.ConnectionClosed as e:
        out["drain"].append(e.rcvd.code if e.rcvd else None)
    except Exception as e:  # noqa: BLE001
        out["drain"].append(type(e).__name__)
    return out


def live_metrics(used: dict[str, set[str]], used_exprs: list[tuple[str, str]], binaries: dict[str, Path]) -> None:
    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="sb-live-"))
    logs = OUT / "live"
    logs.mkdir(exist_ok=True)
    servers = []

    def start(name, argv, env=None):
        f = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(p)
        return p

    try:
        nats_port, redis_port, stub_port = free_port(), free_port(), free_port()
        gw_port, gw_admin, wk_admin = free_port(), free_port(), free_port()
        (work / "js").mkdir()
        nats = start("nats", ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(work / "js")])
        redis = start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(work)])
        stub = StubServer(("127.0.0.1", stub_port), StubHandler)
        servers.append(stub)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        if not (wait_port(nats_port) and wait_port(redis_port)):
            R.fail("live stack", "nats-server or redis-server did not start (see .out/live/)")
            return
        base = {"PATH": os.environ.get("PATH", ""), "HOME": str(work),
                "SB_NATS_URL": f"nats://127.0.0.1:{nats_port}", "SB_REDIS_URL": f"redis://127.0.0.1:{redis_port}",
                "SB_PREFIX": "helmtest", "SB_LOG_FORMAT": "text", "SB_LOG": "warn"}
        gw_env = {**base, "SB_LISTEN": f"127.0.0.1:{gw_port}", "SB_ADMIN_LISTEN": f"127.0.0.1:{gw_admin}",
                  "SB_NODE_ID": "helmtest-gw", "SB_JWT_SECRET": SECRET, "SB_PUBLIC_NAMESPACES": "lobby",
                  "SB_DRAIN_SECS": "2", "SB_HEARTBEAT_SECS": "1", "SB_USER_CONTEXT_TIMEOUT_MS": "3000"}
        wk_env = {**base, "SB_ADMIN_LISTEN": f"127.0.0.1:{wk_admin}", "SB_NODE_ID": "helmtest-wk",
                  "SB_LLM_BASE_URL": f"http://127.0.0.1:{stub_port}/v1", "SB_LLM_MAX_ATTEMPTS": "2",
                  "SB_LLM_BACKOFF_BASE_MS": "10", "SB_LLM_BACKOFF_MAX_MS": "20",
                  "SB_BACKEND_URL": f"http://127.0.0.1:{stub_port}", "SB_SHUTDOWN_GRACE_SECS": "1"}
        worker = start("worker", [str(binaries["worker"])], wk_env)
        gateway = start("gateway", [str(binaries["gateway"])], gw_env)
        ready = wait_http(f"http://127.0.0.1:{wk_admin}/readyz", 30) and wait_http(f"http://127.0.0.1:{gw_admin}/readyz", 30)
        if not R.check(ready, "live stack ready", "gateway and worker answer /readyz 200 on NATS + Redis",
                       "not ready within 30 s (see helm/tests/.out/live/*.log)"):
            return
        # The compose Prometheus config (prometheus/prometheus.yml), pointed at these
        # processes, scraping every second, with the alert rules loaded.
        prom_port = free_port()
        prom_cfg = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
        prom_cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        prom_cfg["rule_files"] = [str(RULES)]
        for job in prom_cfg["scrape_configs"]:
            port = gw_admin if job["job_name"] == "switchboard-gateway" else wk_admin
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        (work / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
        start("prometheus", ["prometheus", f"--config.file={work / 'prometheus.yml'}",
                                    f"--web.listen-address=127.0.0.1:{prom_port}", f"--storage.tsdb.path={work / 'prom'}"])
        ws_url = f"ws://127.0.0.1:{gw_port}/ws"
        story = asyncio.run(drive_traffic(ws_url))
        R.ok("live traffic", "; ".join(story))
        seen: dict[str, set[str]] = {"gateway": set(), "worker": set()}
        gw_text, wk_text = scrape(gw_admin), scrape(wk_admin)
        (logs / "gateway.metrics").write_text(gw_text)
        (logs / "worker.metrics").write_text(wk_text)
        seen["gateway"] |= exposition_names(gw_text)
        seen["worker"] |= exposition_names(wk_text)
        for label, text in (("gateway", gw_text), ("worker", wk_text)):
            res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
            lint = [l for l in (res.stdout + res.stderr).splitlines() if l.strip() and "no help text" not in l]
            R.check(not lint, f"promtool check metrics {label}", f"{len(exposition_names(text))} series names, exposition well-formed (HELP texts absent: the exporter is not given descriptions)",
                    "; ".join(lint[:10]))
        R.add(*prometheus_queries(prom_port, used_exprs))
        # A second worker, then a worker stopped mid-stream (hand-back and redelivery).
        wk2_admin = free_port()
        worker2 = start("worker2", [str(binaries["worker"])], {**wk_env, "SB_ADMIN_LISTEN": f"127.0.0.1:{wk2_admin}", "SB_NODE_ID": "helmtest-wk2"})
        if wait_http(f"http://127.0.0.1:{wk2_admin}/readyz", 30):
            workers, ports = [worker, worker2], [wk_admin, wk2_admin]
            story = asyncio.run(handback(ws_url, workers, ports))
            alive = [i for i, w in enumerate(workers) if w.poll() is None]
            ok = len(alive) == 1 and "came from the other worker" in story
            R.check(ok, "worker shutdown hand-back", story, story)
            for i in range(2):
                if workers[i].poll() is None:
                    worker, wk_admin = workers[i], ports[i]
            seen["worker"] |= exposition_names(scrape(wk_admin))
        else:
            R.fail("worker shutdown hand-back", "second worker not ready")
        # Dependency failures (for the error counters), then SIGTERM, with one client
        # held open throughout: it must get `reconnect` and close 1012 from the drain.
        late = asyncio.run(late_phases(ws_url, redis, nats, gateway, gw_admin, wk_admin, seen))
        R.check(late.get("chat_without_nats") == "UNAVAILABLE" and late["unavailable"] == "UNAVAILABLE", "dependency failures",
                "NATS stopped: chat.send answered UNAVAILABLE; Redis stopped: a new connection got UNAVAILABLE",
                f"chat.send without NATS: {late.get('chat_without_nats')}; connect without Redis: {late['unavailable']}")
        R.check(late["drain"] == ["reconnect", 1012] and late["draining_seen"], "gateway drain",
                "SIGTERM: switchboard_draining 1 while draining; the held client got reconnect + close 1012",
                f"client saw {late['drain']}, draining gauge seen: {late['draining_seen']}")
        rc = gateway.wait(30)
        took = time.monotonic() - late["sigterm_at"]
        # The chart's budget after preStop: SB_DRAIN_SECS + 8 s (see _validate.tpl).
        budget = int(gw_env["SB_DRAIN_SECS"]) + 8
        R.check(rc == 0 and took <= budget + 1, "gateway drain exit",
                f"exited 0 {took:.1f} s after SIGTERM, within the chart's budget of drain + 8 s = {budget} s",
                f"exit code {rc} after {took:.1f} s (budget {budget} s)")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        wrc = worker.wait(30)
        took = time.monotonic() - t0
        # The chart's budget: SB_SHUTDOWN_GRACE_SECS + 10 s (see _validate.tpl).
        budget = int(wk_env["SB_SHUTDOWN_GRACE_SECS"]) + 10
        R.check(wrc == 0 and took <= budget + 1, "worker shutdown exit",
                f"exited 0 {took:.1f} s after SIGTERM (NATS down), within the chart's budget of grace + 10 s = {budget} s",
                f"exit code {wrc} after {took:.1f} s (budget {budget} s)")

        declared = set(re.findall(r'"(switchboard_[a-z0-9_]+)"', (ROOT / "shared/src/metrics.rs").read_text()))
        everything = seen["gateway"] | seen["worker"]
        for what, names in used.items():
            missing, event_only = [], []
            for n in sorted(names):
                if n in everything:
                    continue
                base_name = re.sub(r"_(bucket|sum|count)$", "", n)
                if n in EVENT_ONLY and (n in declared or base_name in declared):
                    event_only.append(n)
                else:
                    missing.append(n)
            detail = f"{len(names) - len(event_only)} names seen in /metrics"
            if event_only:
                detail += f"; event-only, declared in shared/src/metrics.rs: {', '.join(event_only)}"
            R.check(not missing, f"metric names in {what}", detail, f"not exported by gateway or worker: {missing}")
        unused_event_only = sorted(n for n in EVENT_ONLY if n in everything)
        if unused_event_only:
            print(f"     (event-only metrics that did appear this run: {', '.join(unused_event_only)})")
    finally:
        for s in servers:
            s.shutdown()
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        shutil.rmtree(work, ignore_errors=True)


# --- main -------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", type=Path, help="gateway binary")
    ap.add_argument("--worker", type=Path, help="worker binary")
    ap.add_argument("--no-live", action="store_true", help="skip the live metrics run")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    started = time.time()

    def guarded(name, fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - report and continue with the other checks
            R.fail(name, f"{type(e).__name__}: {e}")
            traceback.print_exc()
            return None

    section("chart: lint, render, invariants, Kubernetes schemas")
    rendered = {}
    for name, values in value_sets().items():
        guarded(f"lint {name}", lint, CHART, values, name)
        docs = guarded(f"render {name}", render, CHART, values)
        if docs is None:
            continue
        write_stream(OUT / f"{name}.yaml", docs)
        kinds = sorted({d["kind"] for _, d in docs})
        R.ok(f"render {name}", f"{len(docs)} objects: {', '.join(kinds)}")
        rendered[name] = docs
        guarded(f"invariants {name}", invariants, name, docs, values)
        guarded(f"admin port private {name}", admin_exposure, name, docs)
        guarded(f"env {name}", env_expectations, name, docs)
        guarded(f"kubernetes-validate {name}", k8s_validate, name, docs)

    section("values that must fail")
    guarded("bad values", bad_values)

    section("optional sub-charts (stubs in a temporary copy)")
    sub = guarded("subcharts", stub_subcharts)
    if sub:
        rendered["subcharts"] = sub

    section("alert rules")
    guarded("rules", rules_checks)

    section("dashboard")
    exprs = guarded("dashboard", dashboard_checks) or []
    guarded("copies", copies_check)

    used = {"dashboard": set(), "alert rules": set()}
    for _, e in exprs:
        used["dashboard"] |= metric_names(e)
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            used["alert rules"] |= metric_names(r["expr"])

    binaries = {k: v for k, v in (("gateway", args.gateway), ("worker", args.worker)) if v}
    if len(binaries) == 2:
        section("rendered env through gateway/worker --check-config")
        known = {k: binary_env_names(v) for k, v in binaries.items()}
        guarded("check-config harness", check_config_refuses, binaries)
        guarded("schema coverage", schema_coverage, known)
        for name, docs in rendered.items():
            guarded(f"check-config {name}", check_config, name, docs, binaries, known)
        if args.no_live:
            R.skip("metrics", "--no-live")
        else:
            section("metric names against a running gateway and worker")
            guarded("live metrics", live_metrics, used, exprs, binaries)
    else:
        R.skip("check-config and live metrics", "no --gateway/--worker binaries given")

    failed = [r for r in R.results if r[0] == "FAIL"]
    passed = [r for r in R.results if r[0] == "PASS"]
    skipped = [r for r in R.results if r[0] == "SKIP"]
    print(f"\nhelm checks finished in {time.time() - started:.1f} s; outputs in {OUT.relative_to(ROOT)}/")
    if failed:
        print("failed:")
        for _, n, d in failed:
            print(f"  {n}: {d[:300]}")
    tail = f", {len(skipped)} skipped" if skipped else ""
    print(f"{len(passed)} passed, {len(failed)} failed{tail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
