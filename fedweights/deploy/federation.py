"""Files the ``flwr`` CLI needs, written into the run directory: a private ``FLWR_HOME`` with the
federation (where the SuperLink is and how to trust it) and a minimal Flower App directory.

The App directory holds only a ``pyproject.toml`` whose components point at the installed
``fedweights`` package, so ``flwr run`` works for a non-editable install too. The run config
travels as the App's default config (every key, so nothing has to be declared elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from ..config import RunConfig
from ..fileio import atomic_write_bytes

FEDERATION = "fedweights"
SERVER_APP = "fedweights.flower.server_app:app"
CLIENT_APP = "fedweights.flower.client_app:app"


def write_flwr_home(home: Path, address: str, root_certificates: str | None) -> Path:
    """``HOME/config.toml`` naming the SuperLink at ``address`` (TLS with that CA, or insecure)."""
    trust = {"root-certificates": str(Path(root_certificates).resolve())} if root_certificates else {"insecure": True}
    superlink = {"default": FEDERATION, FEDERATION: {"address": address, **trust}}
    path = Path(home) / "config.toml"
    atomic_write_bytes(path, tomli_w.dumps({"superlink": superlink}).encode())
    return path


def write_app_dir(directory: Path, config: RunConfig) -> Path:
    """A Flower App directory running fedweights' ServerApp/ClientApp with ``config`` as its run config."""
    app = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedweights-run", "version": "1.0.0", "license": "Apache-2.0", "dependencies": [],
                    "description": "A fedweights run (written by fedweights server)"},
        "tool": {"flwr": {"app": {
            "publisher": "fedweights",
            "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
            "config": config.to_flat(),
        }}},
    }
    path = Path(directory) / "pyproject.toml"
    atomic_write_bytes(path, tomli_w.dumps(app).encode())
    return Path(directory)
