"""deploy/ checked against the code it deploys: the Helm chart (helm lint + helm template, parsed), compose.yaml,
the Dockerfile and the Grafana dashboard. Commands are parsed by the real CLI parser, config files loaded by the
real settings, ports compared with the settings' web_port, probe and metrics paths with the worker's routes,
and every metric the dashboard queries with what a worker exposes.

helm is built once per machine from its Go module (deploy/helm.sh, cached beside the virtualenv); without go or
the module proxy these tests fail, they never skip. No Docker engine here: images are not built or run.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_packaging import PYPROJECT, lock_requirers
from test_streams_agents import make_worker

from sparc_stream.cli.main import build_parser
from streams.settings import WorkerSettings, read_config_file

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "sparc-stream"
DASHBOARD = CHART / "dashboards" / "sparc-stream.json"


@pytest.fixture(scope="module")
def helm() -> str:
    built = subprocess.run(["bash", str(DEPLOY / "helm.sh")], capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, f"deploy/helm.sh could not provide helm:\n{built.stderr[-3000:]}"
    return built.stdout.strip().splitlines()[-1]


def render(helm: str, *sets: str) -> list[dict]:
    args = [a for s in sets for a in ("--set", s)]
    done = subprocess.run([helm, "template", "rel", str(CHART), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(docs: list[dict], kind: str, name_part: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


@pytest.fixture(scope="module")
def routes(tmp_path_factory) -> set[str]:
    """The worker's HTTP routes, as its views register them."""
    w = make_worker(tmp_path_factory.mktemp("routes"))
    try:
        return set(w.app.web.views)
    finally:
        w.close()


def parse_command(argv: list[str]):
    """argv after the `sparc` entry point, parsed by the real CLI parser (SystemExit on a bad one)."""
    return build_parser().parse_args(argv)


def config_from(text: str, tmp_path: Path, name: str = "sparc.toml") -> WorkerSettings:
    path = tmp_path / name
    path.write_text(text)
    read_config_file(path)  # every key is a setting, in its own section
    return WorkerSettings.load(path)


def mounted_at(container: dict, path: str) -> dict:
    """The volume mount that holds `path` (the longest mountPath that is a prefix of it)."""
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is on no volume of {container['name']}"
    return max(mounts, key=lambda m: len(m["mountPath"]))


# ------------------------------------------------------------------------------------------------ helm


def test_helm_lint_passes_with_defaults_and_with_everything_on(helm):
    for sets in ([], ["serviceMonitor.enabled=true", "grafanaDashboard.enabled=true", "kafka.tlsSecret.name=t",
                      "kafka.tlsSecret.clientCertificate=true", "kafka.saslPasswordSecret.name=s"]):
        done = subprocess.run([helm, "lint", str(CHART), "--strict", *[a for s in sets for a in ("--set", s)]],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_chart_runs_the_cli_with_its_config_ports_probes_and_volumes(helm, routes, tmp_path):
    docs = render(helm)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Service", "Service", "StatefulSet"]
    sts = one(docs, "StatefulSet", "worker")
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = parse_command(container["args"])
    assert args.command == "worker" and args.func.__module__ == "sparc_stream.cli.worker"
    config_mount = mounted_at(container, str(args.config))
    assert config_mount["name"] == "config" and config_mount["subPath"] == "sparc.toml"
    [config_volume] = [v for v in pod["volumes"] if v["name"] == "config"]
    config_map = one(docs, "ConfigMap", "config")
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    settings = config_from(config_map["data"]["sparc.toml"], tmp_path)

    [port] = container["ports"]
    assert port["name"] == "http" and port["containerPort"] == settings.web_port
    assert settings.web_host == "0.0.0.0"  # reachable through the Service
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"} and path in routes
    service = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()

    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert mounted_at(container, str(settings.data_dir))["name"] == "tables" and "tables" in claims
    store_path = settings.store_url.split("://", 1)[1]
    assert settings.store_url.startswith("rocksdb://") and mounted_at(container, store_path)["name"] == "snapshots"
    assert "snapshots" in claims
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and mounted_at(container, "/tmp")
    assert sts["spec"]["replicas"] == 1 and "cpu" in container["resources"]["requests"]


def test_the_chart_wires_sasl_and_tls_secrets_into_the_settings(helm, tmp_path, monkeypatch):
    docs = render(helm, "kafka.tlsSecret.name=kafka-tls", "kafka.tlsSecret.clientCertificate=true",
                  "kafka.saslPasswordSecret.name=kafka-user", "kafka.saslPasswordSecret.key=pw",
                  "config.kafka.security_protocol=SASL_SSL", "config.kafka.sasl_mechanism=SCRAM-SHA-512",
                  "config.kafka.sasl_username=sparc")
    [container] = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    [password] = [e for e in container["env"] if e["name"] == "SPARC_SASL_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "kafka-user", "key": "pw"}
    monkeypatch.setenv("SPARC_SASL_PASSWORD", "from-the-secret")  # what Kubernetes gives the container
    settings = config_from(one(docs, "ConfigMap", "config")["data"]["sparc.toml"], tmp_path)
    conn = settings.kafka_connection()
    assert conn.security_protocol == "SASL_SSL" and conn.sasl_password.get_secret_value() == "from-the-secret"
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    [tls] = [v for v in pod["volumes"] if v["name"] == "kafka-tls"]
    assert tls["secret"]["secretName"] == "kafka-tls"
    for path in (conn.ssl_cafile, conn.ssl_certfile, conn.ssl_keyfile):
        assert mounted_at(container, str(path))["name"] == "kafka-tls"
    assert "from-the-secret" not in json.dumps(docs)


def test_the_chart_scrapes_metrics_and_ships_the_dashboard(helm, routes):
    docs = render(helm, "serviceMonitor.enabled=true", "grafanaDashboard.enabled=true")
    monitor = one(docs, "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and "/metrics" in routes
    services = [d for d in docs if d["kind"] == "Service"]
    selected = [s for s in services if monitor["spec"]["selector"]["matchLabels"].items()
                <= s["metadata"]["labels"].items()]
    assert len(selected) == 1 and selected[0]["spec"].get("clusterIP") != "None"  # scraped once, not twice
    dashboard = one(docs, "ConfigMap", "dashboard")
    assert json.loads(dashboard["data"]["sparc-stream.json"]) == json.loads(DASHBOARD.read_text())
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_chart_refuses_a_second_worker_replica(helm):
    done = subprocess.run([helm, "template", "rel", str(CHART), "--set", "roles.worker.replicas=2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "roles.worker.replicas must be 1" in done.stderr


# --------------------------------------------------------------------------------------------- compose


def test_compose_runs_kafka_in_kraft_mode_and_the_worker_as_the_cli_expects(routes, tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"kafka", "worker", "prometheus", "grafana"}
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"].removeprefix("PLAINTEXT://")

    worker = services["worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / ".." / worker["build"]["dockerfile"]).is_file()
    args = parse_command(worker["command"])
    assert args.command == "worker"
    sources = {target.split(":")[0]: source for source, target in (v.split(":", 1) for v in worker["volumes"])}
    settings = config_from((DEPLOY / sources[str(args.config)]).read_text(), tmp_path)
    assert settings.bootstrap_servers == [advertised]
    assert settings.web_host == "0.0.0.0"
    [published] = worker["ports"]
    host, host_port, container_port = published.split(":")
    assert host == "127.0.0.1" and int(container_port) == settings.web_port  # loopback only on the host
    health = " ".join(worker["healthcheck"]["test"])
    assert f"127.0.0.1:{settings.web_port}/livez" in health and "/livez" in routes
    assert str(settings.data_dir).startswith("/var/lib/sparc") and "worker-state:/var/lib/sparc" in worker["volumes"]

    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and "/metrics" in routes
    assert job["static_configs"][0]["targets"] == [f"worker:{settings.web_port}"]

    grafana = services["grafana"]
    mounts = {target: source for source, target, *_ in (v.split(":") for v in grafana["volumes"])}
    assert (DEPLOY / mounts["/var/lib/grafana/dashboards"] / DASHBOARD.name).is_file()
    datasources = yaml.safe_load((DEPLOY / mounts["/etc/grafana/provisioning/datasources/sparc.yaml"]).read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# ------------------------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_dockerfile_is_multi_stage_non_root_cpu_torch_and_runs_sparc(routes, tmp_path):
    steps = dockerfile_instructions()
    assert sum(1 for op, _ in steps if op == "FROM") >= 2
    assert ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in steps
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["sparc"]
    cmd = json.loads(dict(steps)["CMD"])
    args = parse_command(cmd)
    assert args.command == "worker"
    user = [arg for op, arg in steps if op == "USER"][-1]
    assert not user.startswith(("root", "0"))
    copied = {arg.split()[-1]: arg.split()[-2] for op, arg in steps if op == "COPY" and "--from" not in arg}
    settings = config_from((ROOT / copied[str(args.config)]).read_text(), tmp_path)
    assert int(dict(steps)["EXPOSE"]) == settings.web_port and settings.web_host == "0.0.0.0"
    health = dict(steps)["HEALTHCHECK"]
    assert f"127.0.0.1:{settings.web_port}/livez" in health and "/livez" in routes
    for package in ("sparc_stream", "trainer", "streams", "codebook_store", "replay"):
        assert package in copied
    lock = {line.split("==")[0] for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    assert "torch" in lock  # the image installs the lock's torch version from TORCH_INDEX
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert "--index-url \"$TORCH_INDEX\"" in run and "requirements.lock" in run
    assert "--require-hashes" in run and "pip check" in run


def test_the_image_leaves_out_exactly_what_only_the_test_extra_and_the_cuda_torch_bring():
    """The Dockerfile's drop lists against the lock: a package the image leaves out is needed by nothing it keeps,
    and everything that only the `test` extra brings is left out."""
    run = " ".join(arg for op, arg in dockerfile_instructions() if op == "RUN")
    test_only = set(re.search(r"drop='([^']+)'", run).group(1).split("|"))
    cuda = re.search(r'drop="\$drop\|([^"]+)"', run).group(1)
    via = lock_requirers()
    test_extra = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    expected, grew = set(test_extra), True
    while grew:  # packages whose every requirer is in the test-only set
        more = {name for name, by in via.items() if by and by <= expected and "." not in by}
        grew, expected = bool(more - expected), expected | more
    assert test_only == expected
    dropped = {name for name in via if re.fullmatch(f"({cuda})", name)}
    assert "torch" in dropped and any(name.startswith("nvidia-") for name in dropped)
    for name in dropped - {"torch"}:
        assert via[name] <= dropped, f"{name} is needed by {via[name] - dropped}, which the CPU image keeps"


# ------------------------------------------------------------------------------------------- dashboard


def test_every_metric_on_the_dashboard_is_one_the_worker_exposes(tmp_path):
    from test_streams_probes import one_train_message

    from streams.agents import handle_train_message, publish
    from streams.records import Source

    w = make_worker(tmp_path, min_utilisation=0.0)

    async def scenario():
        w.app.finalize()
        await handle_train_message(w, one_train_message(), Source(topic="train", partition=0, offset=0))
        await publish(w)

    try:
        asyncio.run(scenario())
        w.metrics.retrieve_seconds.labels("200").observe(0.001)
        text = w.metrics.render().decode()
    finally:
        w.close()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    exposed |= set(re.findall(r"^# TYPE (\S+) ", text, re.M))  # families without samples yet (the lag, here)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b((?:sparc|process|python)_[a-z_]+)\b", e)}
    assert used and used <= exposed, used - exposed
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("events", "lag", "snapshot age", "dead letters", "codebook", "latency"):
        assert topic in titles, topic
