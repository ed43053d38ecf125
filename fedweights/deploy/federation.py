"""Files the ``flwr`` CLI needs, written into the run directory: a private ``FLWR_HOME`` with the
federation (where the SuperLink is and how to trust it) and a minimal Flower App directory.

The App directory holds only a ``pyproject.toml`` whose components point at the installed
``fedweights`` package, so ``flwr run`` works for a non-editable install too. The run config
travels as the App's default config (every key, so nothing has to be declared elsewhere).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import RunConfig
from ..fileio import atomic_write_bytes

FEDERATION = "fedweights"
SERVER_APP = "fedweights.flower.server_app:app"
CLIENT_APP = "fedweights.flower.client_app:app"


def write_flwr_home(home: Path, address: str, root_certificates: str | None) -> Path:
    """``HOME/config.toml`` naming the SuperLink at ``address`` (TLS with that CA, or insecure)."""
    lines = ["[superlink]", f'default = "{FEDERATION}"', "", f"[superlink.{FEDERATION}]", f"address = {_toml(address)}"]
    if root_certificates:
        lines.append(f"root-certificates = {_toml(str(Path(root_certificates).resolve()))}")
    else:
        lines.append("insecure = true")
    path = Path(home) / "config.toml"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def write_app_dir(directory: Path, config: RunConfig) -> Path:
    """A Flower App directory running fedweights' ServerApp/ClientApp with ``config`` as its run config."""
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedweights-run"',
        'version = "1.0.0"',
        'description = "A fedweights run (written by fedweights server)"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedweights"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{CLIENT_APP}"',
        "",
        "[tool.flwr.app.config]",
        *(f"{_toml(key)} = {_toml(value)}" for key, value in config.to_flat().items()),
    ]
    path = Path(directory) / "pyproject.toml"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return Path(directory)


def _toml(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan"
    return json.dumps(value)  # a TOML basic string: JSON's escapes are valid TOML escapes
