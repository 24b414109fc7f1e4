"""The deployment files that cannot run here, parsed and checked against the code.

Docker, Compose and Kubernetes are not on a CI machine and systemd is not
running, so these files are read instead (PyYAML, a Dockerfile and unit
parser of a few lines): the image's entrypoint is ``z4j brain`` and its
health check asks /health/ready (and that check is run, against a real
brain, to exit 0); ports and probes match the configuration's defaults;
every Z4J_* variable they set is a setting of z4j/config.py; the systemd
unit runs ``z4j brain``, hardened, and two instances started with its
environment (systemd itself is not running here) share the ports on one
Postgres; ``systemd-analyze verify`` finds nothing to say about it where
that tool exists. deploy/nginx/z4j.conf is run by
tests/test_deploy_nginx.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import trio
import yaml

from z4j.config import Config, env_name, load_config, parse_bind
from z4j.testing.brain import BrainProcess, make_config, running_brain

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes" / "z4j.yaml"
UNIT = DEPLOY / "systemd" / "z4j@.service"
UNIT_ENV = DEPLOY / "systemd" / "z4j.env"
NGINX = DEPLOY / "nginx" / "z4j.conf"

SETTINGS = {env_name(field.name) for field in attrs.fields(Config)}
HTTP_PORT = parse_bind(Config().http_bind)[1]
INGEST_PORT = parse_bind(Config().ingest_bind)[1]


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last:]


def dockerfile_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in steps:
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """A systemd unit's (section, key, value), repeated keys kept in order."""
    section, entries = "", []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def z4j_names_outside_comments(path: Path) -> set[str]:
    text = "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    return set(re.findall(r"\bZ4J_[A-Z0-9_]+", text))


def test_every_z4j_variable_in_deploy_is_a_setting() -> None:
    files = [DOCKERFILE, COMPOSE, KUBERNETES, UNIT, UNIT_ENV, NGINX]
    for path in files:
        unknown = z4j_names_outside_comments(path) - SETTINGS
        assert not unknown, f"{path.relative_to(ROOT)} uses {unknown}, not in z4j/config.py"
    assert SETTINGS & z4j_names_outside_comments(UNIT)  # the check reads something


def test_the_image_runs_z4j_brain_unprivileged_with_its_ports() -> None:
    steps = final_stage(DOCKERFILE)
    (entrypoint,) = [json.loads(rest) for word, rest in steps if word == "ENTRYPOINT"]
    assert entrypoint == ["z4j", "brain"]
    assert not [rest for word, rest in steps if word == "CMD"]  # nothing appended to it
    (user,) = [rest for word, rest in steps if word == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    exposed = {int(p) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert exposed == {HTTP_PORT, INGEST_PORT}
    env = dockerfile_env(steps)
    assert parse_bind(env["Z4J_HTTP_BIND"])[1] == HTTP_PORT
    assert parse_bind(env["Z4J_INGEST_BIND"])[1] == INGEST_PORT
    # Built from this checkout, not from an index.
    build = instructions(DOCKERFILE)
    assert ("COPY", ". .") in build
    assert any(word == "RUN" and "pip install ." in rest for word, rest in build)
    ignored = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "LICENSE", "z4j"):
        assert needed not in ignored


def healthcheck_command() -> list[str]:
    (check,) = [rest for word, rest in final_stage(DOCKERFILE) if word == "HEALTHCHECK"]
    assert "--start-period=" in check and "--timeout=" in check
    command = json.loads(check[check.index("CMD") + 3 :])
    assert isinstance(command, list) and command[0] == "python"
    return [str(part) for part in command]


async def test_the_image_health_check_asks_readiness_and_passes_on_a_ready_brain(
    tmp_path: Path,
) -> None:
    command = healthcheck_command()
    assert "/health/ready" in command[-1]
    config = make_config(tmp_path / "data")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            _, port = brain.addresses.http
            env = {**os.environ, "Z4J_HTTP_BIND": f"0.0.0.0:{port}"}
            ready = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, *command[1:]], env=env, capture_output=True, check=False
                )
            )
            assert ready.returncode == 0, ready.stderr
    # And it fails when nothing answers there (the brain is gone).
    gone = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, check=False
        )
    )
    assert gone.returncode != 0


def test_compose_runs_postgres_two_replicas_and_the_proxy() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    brains = {
        name: s for name, s in services.items() if s.get("build", {}).get("context") == "../.."
    }
    assert sorted(brains) == ["brain-1", "brain-2"]
    for name, brain in brains.items():
        built = COMPOSE.parent / brain["build"]["context"] / brain["build"]["dockerfile"]
        assert built.resolve() == DOCKERFILE.resolve()
        assert (COMPOSE.parent / brain["build"]["context"]).resolve() == ROOT
        env = brain["environment"]
        assert set(env) <= SETTINGS
        assert "@postgres:5432/" in env["Z4J_DATABASE_URL"]
        assert {"Z4J_SECRET", "Z4J_INGEST_TOKEN", "Z4J_DATABASE_URL"} <= set(env)
        assert env["Z4J_INSTANCE_NAME"] == name
        assert brain["depends_on"]["postgres"]["condition"] == "service_healthy"
        (published,) = brain["ports"]
        assert published.rpartition(":")[2] == str(INGEST_PORT)
        assert brain["volumes"] == [f"{name}:/var/lib/z4j"]
        assert "command" not in brain and "entrypoint" not in brain  # the image's z4j brain
    assert "postgres" in services["postgres"]["image"]
    proxy = services["proxy"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in proxy["volumes"]}
    assert (COMPOSE.parent / mounts["/etc/nginx/conf.d/z4j.conf"]).resolve() == NGINX.resolve()
    assert (COMPOSE.parent / proxy["build"]["context"] / proxy["build"]["dockerfile"]).exists()
    assert set(proxy["depends_on"]) == set(brains)
    # The proxy's upstreams are these services at the brain's HTTP port.
    upstreams = re.findall(r"^\s*server (\S+):(\d+) ", NGINX.read_text(), flags=re.MULTILINE)
    assert sorted(set(upstreams)) == [(name, str(HTTP_PORT)) for name in sorted(brains)]
    # TLS paths the proxy reads are the ones compose mounts.
    for path in re.findall(r"ssl_certificate(?:_key)?\s+(\S+);", NGINX.read_text()):
        assert Path(path).parent == Path("/etc/nginx/tls") and "/etc/nginx/tls" in mounts


def kubernetes_documents() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    return {d["kind"]: d for d in documents}


def test_kubernetes_probes_ports_secrets_and_budget_match_the_brain() -> None:
    docs = kubernetes_documents()
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    (container,) = pod["spec"]["containers"]
    assert "command" not in container and not container.get("args")  # the image's z4j brain
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": HTTP_PORT, "ingest": INGEST_PORT}
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= SETTINGS
    for name in ("Z4J_SECRET", "Z4J_DATABASE_URL"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
        assert "value" not in env[name]
    assert parse_bind(env["Z4J_HTTP_BIND"]["value"])[1] == HTTP_PORT
    assert parse_bind(env["Z4J_INGEST_BIND"]["value"])[1] == INGEST_PORT

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe("readinessProbe") == ("/health/ready", HTTP_PORT)
    assert probe("livenessProbe") == ("/health/live", HTTP_PORT)
    # Non-root, as the image is; the data directory is a volume.
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["Z4J_DATA_DIR"]["value"] in mounts
    # Grace above the brain's own shutdown grace.
    assert pod["spec"]["terminationGracePeriodSeconds"] > Config().shutdown_grace_seconds

    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    budget = docs["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    ingress = docs["Ingress"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_authorization"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]


def unit_environment(instance: str, host: str = "host") -> dict[str, str]:
    """What systemd would give instance ``instance``: the file, then Environment= lines."""
    env = env_file(UNIT_ENV)
    for section, key, value in unit_entries(UNIT):
        if section == "Service" and key == "Environment":
            name, _, text = value.partition("=")
            env[name] = text.replace("%i", instance).replace("%H", host)
    return env


def test_the_systemd_unit_runs_z4j_brain_hardened() -> None:
    entries = unit_entries(UNIT)
    service = {key: value for section, key, value in entries if section == "Service"}
    (exec_start,) = [v for s, k, v in entries if s == "Service" and k == "ExecStart"]
    program, *args = shlex.split(exec_start)
    assert Path(program).name == "z4j" and args == ["brain"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["User"] != "root"
    env = unit_environment("1")
    assert set(env) <= SETTINGS
    assert Path(env["Z4J_DATA_DIR"]) in {Path(p) for p in service["ReadWritePaths"].split()}
    assert Path(env["Z4J_BUFFER_PATH"]).parent == Path(env["Z4J_DATA_DIR"])
    # Above the brain's own grace, so systemd never kills a clean stop.
    assert int(service["TimeoutStopSec"]) > Config().shutdown_grace_seconds


def test_the_units_environment_is_a_valid_configuration_for_n_instances() -> None:
    configs = [load_config(env=unit_environment(str(i))) for i in (1, 2)]
    for config in configs:
        assert config.so_reuseport and config.uses_postgres and config.secret is not None
        assert config.instances == 1  # one brain per unit, not a supervisor in each
        assert parse_bind(config.http_bind)[1] == HTTP_PORT  # fixed ports, shared
        assert parse_bind(config.ingest_bind)[1] == INGEST_PORT
    assert configs[0].resolved_buffer_path != configs[1].resolved_buffer_path
    assert configs[0].instance_name != configs[1].instance_name


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return  # checked by the parse above; the tool is not on every machine
    # verify wants the program and the environment file to exist here.
    text = UNIT.read_text().replace("/opt/z4j/bin/z4j", shutil.which("true") or "/bin/true")
    text = text.replace("EnvironmentFile=/etc/z4j/z4j.env", f"EnvironmentFile={UNIT_ENV}")
    (tmp_path / "z4j@.service").write_text(text)
    result = subprocess.run(
        [tool, "verify", "--man=no", str(tmp_path / "z4j@1.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = [line for line in (result.stdout + result.stderr).splitlines() if "z4j@" in line]
    assert result.returncode == 0 and not said, result.stdout + result.stderr


def test_two_instances_of_the_unit_share_the_ports_on_one_postgres(
    tmp_path: Path, pg_url: str
) -> None:
    """z4j@1 and z4j@2 as systemd would start them (their Environment= lines
    over the environment file), with this machine's database, directory and
    ports: both get ready on the same two ports, each with its own buffer."""
    http_port, ingest_port = free_port(), free_port()
    brains = []
    try:
        for instance in ("1", "2"):
            env = unit_environment(instance)
            data_dir = env["Z4J_DATA_DIR"]
            env = {
                name: value.replace(data_dir, str(tmp_path / "data")) for name, value in env.items()
            }
            env |= {
                "Z4J_DATABASE_URL": pg_url,
                "Z4J_HTTP_BIND": f"127.0.0.1:{http_port}",
                "Z4J_INGEST_BIND": f"127.0.0.1:{ingest_port}",
            }
            brains.append(BrainProcess(env, log_path=tmp_path / f"z4j@{instance}.log"))
        assert {b.http for b in brains} == {("127.0.0.1", http_port)}
        assert {b.ingest for b in brains} == {("127.0.0.1", ingest_port)}
        for instance, brain in zip(("1", "2"), brains, strict=True):
            assert f"buffer-{instance}.sqlite3" in brain.log_text()
    finally:
        for brain in brains:
            brain.stop()
    assert all(brain.proc.returncode == 0 for brain in brains)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
