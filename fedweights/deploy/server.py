"""``fedweights server``: a Flower SuperLink plus the fedweights ServerApp run on it.

Everything lives in the run directory: ``metrics.json``, ``model.safetensors`` (``model.he``
under ``--he``) and privacy files as with ``simulate``, plus ``deploy/`` holding the SuperLink
database, a private ``FLWR_HOME``, the generated Flower App and the process logs.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from ..config import RunConfig
from ..errors import RunFailed, UserError
from ..flower.round_loop import RunResult
from ..registry.auth import CA_FILE, SERVER_CERT, SERVER_KEY, tls_file
from ..registry.publish import preflight as publish_preflight
from ..run_dir import RoundRecord, RunDir, default_run_dir
from ..run_lock import RunLock
from ..run_status import FAILED, mark_ended, resume_hint
from ..strategies import build_strategy
from .federation import FEDERATION, write_app_dir, write_flwr_home
from .keys import authorized_keys
from .serverapp_watch import ServerAppWatch
from .processes import ProcessGroup, flower_executable, split_address, wait_healthy

DEPLOY_DIR = "deploy"
DATABASE = "superlink.db"
_FLOWER_LOG_MARKERS = ("INFO ", "WARNING ", "DEBUG ", ":INFO:", ":WARNING:", ":DEBUG:", "Flower App configuration", "- Recommended property")


@dataclass(frozen=True)
class ServerSecurity:
    """How the SuperLink is reached: TLS files (``ca.crt``, ``server.pem``, ``server.key``) or
    explicitly insecure, and the directory of node public keys allowed to join (TLS only)."""

    tls_dir: Path | None = None
    authorized_nodes: Path | None = None
    insecure: bool = False

    def validate(self) -> list[Path]:
        """TLS unless --insecure; node authentication needs TLS (Flower's rule). Returns the
        authorized node keys (checked), none without --authorized-nodes."""
        if self.insecure and self.tls_dir:
            raise UserError("--insecure and --tls-dir contradict each other: give one")
        if not self.insecure and not self.tls_dir:
            raise UserError(
                "TLS is on by default: give --tls-dir DIR (make one with `fedweights keys tls --out DIR "
                "--host SERVER_NAME_OR_IP`), or --insecure to send everything in plaintext"
            )
        if self.authorized_nodes and self.insecure:
            raise UserError("--authorized-nodes needs TLS (Flower authenticates nodes over TLS only): drop --insecure")
        if self.tls_dir:
            for name in (CA_FILE, SERVER_CERT, SERVER_KEY):
                tls_file(self.tls_dir, name)
        return authorized_keys(self.authorized_nodes) if self.authorized_nodes else []


def run_server(
    config: RunConfig,
    address: str,
    security: ServerSecurity,
    console: Console | None = None,
    verbose: bool = False,
) -> RunResult:
    """Start a SuperLink on ``address``, run ``config`` on the nodes that connect; the run's records.

    Raises ``UserError`` for bad settings before any process starts and ``RunFailed`` when the
    run does not complete.
    """
    console = console or Console()
    config.validate()
    node_keys = security.validate()
    host, port = split_address(address, "--address")
    _check_he(config)
    if config.dp.enabled:  # privacy.plan loads Opacus: only for DP runs
        from ..privacy.plan import check_grad_sample_mode
        from ..task import resolve_task

        check_grad_sample_mode(config, lambda: resolve_task(config).model_fn())
    build_strategy(config)  # fail fast on an unknown or unloadable strategy
    publish_preflight(config)
    out = Path(config.out) if config.out else default_run_dir()
    with RunLock(out) as lock:  # also guards deploy/ (the SuperLink's database) from a second server
        config = _absolute_paths(dataclasses.replace(config, out=str(out.resolve())))
        if config.resume:  # a run it cannot resume fails here, before any Flower process starts
            from ..flower.checkpoint import check_resumable

            check_resumable(RunDir(out), config)
        before = _written_at(out / "metrics.json")
        deploy = out / DEPLOY_DIR
        home, logs = deploy / "flwr-home", deploy / "logs"
        if security.insecure:
            console.print("[bold red]WARNING: --insecure: model updates and metrics travel unencrypted and any "
                          "process that can reach the port may join. Use --tls-dir outside a trusted test network.[/bold red]")
        elif not security.authorized_nodes:
            console.print("[yellow]warning: no --authorized-nodes: any node that trusts the CA may join the run[/yellow]")
        connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # where this machine reaches the SuperLink
        ca = str(Path(security.tls_dir, CA_FILE).resolve()) if security.tls_dir else None
        write_flwr_home(home, f"{connect}:{port}", ca)
        app_dir = write_app_dir(deploy / "app", config)
        _check_port_free(host, port, address)  # or wait_healthy below could find another SuperLink there
        with ProcessGroup(logs, env={"FLWR_HOME": str(home.resolve()), **lock.hand_down()}) as group:
            superlink = group.start("superlink", _superlink_argv(host, port, deploy / DATABASE, security))
            scheme = "http" if security.insecure else "https"
            wait_healthy(f"{scheme}://{connect}:{port}/health", superlink, "the SuperLink (see deploy/logs/superlink.log)")
            if node_keys:
                _register(group, node_keys)
            console.print(f"SuperLink listening on {host}:{port} ({'insecure' if security.insecure else 'TLS'}); "
                          f"waiting for {config.wait_for_clients} client(s)")
            died = _stream_run(group, app_dir, console, verbose, superlink, (out / "metrics.json", before))
        _mark_dead_run(out, before, died)  # a ServerApp killed mid-run could not record that itself
        metrics = RunDir(out).read_metrics() if (out / "metrics.json").exists() else {}
        if _written_at(out / "metrics.json") == before:  # the ServerApp never got to the run: its status is old
            metrics = {"status": "not started"}
        if metrics.get("status") != "completed":
            detail = metrics.get("error") or f"see {logs}/superlink.log"
            raise RunFailed(f"the run did not complete (status {metrics.get('status', 'not started')!r}): {detail}")
        return RunResult(out, [RoundRecord(**r) for r in metrics["rounds"]])


def _check_port_free(host: str, port: int, address: str) -> None:
    """A UserError unless ``host:port`` can be listened on: a SuperLink already there (another
    server's, or one a crashed server left behind) would take this run's nodes and its run."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the SuperLink binds it
            sock.bind(sockaddr)
    except OSError as exc:
        hint = (f"another server (or a SuperLink left by one that crashed) is using port {port}; stop it "
                f"(`ss -ltnp 'sport = :{port}'` names it) or give another --address"
                if exc.errno == errno.EADDRINUSE else "give an address of this machine, e.g. 0.0.0.0:PORT")
        raise UserError(f"--address {address}: cannot listen there ({exc.strerror or exc}): {hint}") from None


def _written_at(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _absolute_paths(config: RunConfig) -> RunConfig:
    """File paths in the config made absolute: the ServerApp runs in another process and directory."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path else None

    he = dataclasses.replace(config.he, server_key=absolute(config.he.server_key))
    publish = dataclasses.replace(
        config.publish, token_file=absolute(config.publish.token_file), tls_dir=absolute(config.publish.tls_dir)
    )
    return dataclasses.replace(config, he=he, publish=publish)


def _check_he(config: RunConfig) -> None:
    if not config.he.enabled:
        return
    if not config.he.server_key:
        raise UserError("--he needs the coordinator's key: --he-server-key DIR/server.ctx (from `fedweights keys he`)")
    if not Path(config.he.server_key).is_file():
        raise UserError(f"--he-server-key {config.he.server_key} does not exist")
    if config.he.key:
        raise UserError("the server must not hold the HE secret key: drop he.key (clients pass --he-key)")
    from ..crypto.codec import layout_of
    from ..task import resolve_task

    layout_of(resolve_task(config).model_fn().state_dict())  # a model --he cannot aggregate (integer buffers)


def _superlink_argv(host: str, port: int, database: Path, security: ServerSecurity) -> list[str]:
    argv = [
        flower_executable("flower-superlink"), "--host", host, "--port", str(port),
        "--database", str(database.resolve()), "--disable-runtime-dependency-installation",
    ]
    if security.insecure:
        return [*argv, "--insecure"]
    tls = Path(security.tls_dir).resolve()
    argv += ["--ssl-certfile", str(tls / SERVER_CERT), "--ssl-keyfile", str(tls / SERVER_KEY),
             "--ssl-ca-certfile", str(tls / CA_FILE)]
    return [*argv, "--enable-supernode-auth"] if security.authorized_nodes else argv


def _register(group: ProcessGroup, public_keys: list[Path]) -> None:
    """``flwr supernode register KEY.pub`` for every key, in parallel; keys already registered are fine."""
    flwr = flower_executable("flwr")
    runs = {
        key: subprocess.Popen(
            [flwr, "supernode", "register", str(key.resolve()), FEDERATION],
            env=group.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for key in public_keys
    }
    for key, proc in runs.items():
        output, _ = proc.communicate(timeout=300)
        if proc.returncode != 0 and "already" not in output.lower():
            raise UserError(f"registering node key {key} failed: {output.strip()[-500:]}")


def _stream_run(group: ProcessGroup, app_dir: Path, console: Console, verbose: bool,
                superlink: subprocess.Popen, metrics: tuple[Path, int | None]) -> int | None:
    """``flwr run APP fedweights --stream``, echoing the ServerApp's progress until the run ends;
    the pid of a ServerApp that died mid-run (then ``flwr run`` is stopped at once), else None."""
    argv = [flower_executable("flwr"), "run", str(app_dir.resolve()), FEDERATION, "--stream"]
    run = group.start("flwr-run", argv, stdout=subprocess.PIPE)
    assert run.stdout is not None
    with ServerAppWatch(superlink, *metrics, run) as watch:
        for raw in run.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if verbose or not any(marker in line for marker in _FLOWER_LOG_MARKERS):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
        code = run.wait()
    if code != 0 and watch.died is None:
        sys.stderr.write(group.log_tail("flwr-run") + "\n")
    return watch.died


def _mark_dead_run(out: Path, before: int | None, died: int | None) -> None:
    """metrics.json rewritten by this run but still ``running`` after ``flwr run`` ended: the
    ServerApp died without a word (SIGKILL, the OOM killer). Mark the run failed, saying so."""
    who = f"the ServerApp process (pid {died})" if died else "the ServerApp process"
    mark_ended(out, FAILED, f"{who} died without recording the end of the run (killed, e.g. kill -9 or the "
               f"out-of-memory killer); {resume_hint(out, f'`fedweights server --resume {out}`')}",
               since_ns=before)
