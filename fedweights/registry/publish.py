"""Publish a run's global models to a weight registry, from the coordinator's round loop.

``RegistryPublisher`` is a ``RoundHooks``: with ``publish.every_round`` it publishes each
round's model (``on_round_end``), and it always publishes the final model (``on_run_end``).
Each version's parent is the version this run published before it (the first one continues
the name's newest version), and its manifest carries the run id, the round and the privacy
certificate as of that round. What was published is listed in ``published.json``.

Under HE the coordinator only holds ciphertexts, so publishing is refused there (config
validation); a client publishes the decrypted model with ``fedweights weights push --from-run``.
"""

from __future__ import annotations

import logging

from safetensors.torch import save_file

from ..config import RunConfig
from ..errors import UserError
from ..fileio import atomic_write_json
from ..flower.round_loop import RoundHooks
from ..run_dir import RoundRecord, RunDir
from .certificate import certificate_for_run
from .client import Client

PUBLISHED_FILE = "published.json"
log = logging.getLogger("fedweights.registry")


def preflight(config: RunConfig) -> None:
    """Before a run starts: check the registry is reachable and accepts our writes."""
    if config.publish.registry is None:
        return
    with _client(config) as client:
        client.check_access(write=True)


class RegistryPublisher(RoundHooks):
    """Publishes the run's global models (see the module docstring)."""

    def __init__(self, config: RunConfig, run_dir: RunDir) -> None:
        self._config = config
        self._run_dir = run_dir
        self._parent: str | None = None  # the version this run published last
        self._published: list[dict] = []

    def on_round_end(self, record: RoundRecord, arrays) -> None:
        """Publish this round's model (every_round only; the last round is the final model)."""
        if not self._config.publish.every_round or record.round >= self._config.rounds:
            return
        path = self._run_dir.path / f".round-{record.round}.safetensors"
        tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.to_torch_state_dict().items()}
        save_file(tensors, str(path), metadata={"round": str(record.round), "format": "pt"})
        try:
            self._publish(path, record.round, final=False, tags=[])
        except UserError as exc:  # a registry hiccup must not end a long run; the final publish will report
            log.warning("the model of round %d was not published: %s", record.round, exc)
        finally:
            path.unlink(missing_ok=True)

    def on_run_end(self, run_dir: RunDir, arrays) -> None:
        """Publish the final model (exactly the run's model.safetensors)."""
        try:
            self._publish(run_dir.model_path, self._config.rounds, final=True, tags=self._config.publish.tag_list)
        except UserError as exc:
            raise UserError(
                f"the run completed but publishing its model failed: {exc}. Publish it later with "
                f"`fedweights weights push {run_dir.model_path} --name {self._config.publish.name} --from-run {run_dir.path}`"
            ) from None

    def _publish(self, path, round_: int, final: bool, tags: list[str]) -> None:
        metrics = self._run_dir.read_metrics()
        privacy = certificate_for_run(self._run_dir.path, round_, final, metrics)
        with _client(self._config) as client:
            version = client.push(
                path, self._config.publish.name, tags=tags, parent=self._parent,
                run_id=metrics["run_id"], round=round_, privacy=privacy,
            )  # fmt: skip
        self._parent = version.ref
        self._published.append({"round": round_, "final": final, "ref": version.ref, "sha256": version.sha256, "digest": version.digest})
        atomic_write_json(self._run_dir.path / PUBLISHED_FILE, {"registry": self._config.publish.registry, "versions": self._published})
        log.info("published round %d as %s", round_, version.ref)


def _client(config: RunConfig) -> Client:
    settings = config.publish
    return Client(settings.registry, token_file=settings.token_file, tls_dir=settings.tls_dir)
