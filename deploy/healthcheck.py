#!/usr/bin/env python3
"""Container health probe: GET Flower's /health endpoint; exit 0 on HTTP 200, else 1.

FEDWEIGHTS_HEALTH_URL  the endpoint (the server sets https://127.0.0.1:9092/health). Unset: probe this
                       container's SuperNode (a client), found in /proc with the --port it was given.
FEDWEIGHTS_HEALTH_CA   CA certificate for an https URL; the chain is verified, the host name is not
                       (the probe always dials 127.0.0.1).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from pathlib import Path


def supernode_urls(proc: Path) -> list[str]:
    """Health URLs of the SuperNode processes visible in ``proc`` (their local --port)."""
    urls = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue  # the process ended meanwhile
        # `fedweights client` runs Flower's SuperNode as `python -m fedweights.deploy.supernode`
        if not any(Path(a).name == "flower-supernode" for a in argv[:2]) and "fedweights.deploy.supernode" not in argv[:3]:
            continue
        port = "9094"  # flower-supernode's default
        for i, arg in enumerate(argv):
            if arg == "--port" and i + 1 < len(argv):
                port = argv[i + 1]
            elif arg.startswith("--port="):
                port = arg.split("=", 1)[1]
        urls.append(f"http://127.0.0.1:{port}/health")
    return urls


def healthy(url: str, ca: str | None) -> bool:
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=ca or None)
        context.check_hostname = False
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            return response.status == 200
    except Exception as exc:  # any failure means unhealthy
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return False


def main() -> int:
    url = os.environ.get("FEDWEIGHTS_HEALTH_URL")
    urls = [url] if url else supernode_urls(Path(os.environ.get("FEDWEIGHTS_HEALTH_PROC", "/proc")))
    if not urls:
        print("unhealthy: no flower-supernode process is running", file=sys.stderr)
        return 1
    return 0 if all(healthy(u, os.environ.get("FEDWEIGHTS_HEALTH_CA")) for u in urls) else 1


if __name__ == "__main__":
    sys.exit(main())
