#!/usr/bin/env python3
"""Container health probe: GET a Flower /health endpoint and exit 0 on HTTP 200, else 1.

FEDWEIGHTS_HEALTH_URL  default http://127.0.0.1:9094/health (a SuperNode's local API, i.e. a client)
FEDWEIGHTS_HEALTH_CA   CA certificate for an https URL (the server's TLS); the certificate chain is
                       verified, the host name is not (the probe always dials 127.0.0.1).
"""

import os
import ssl
import sys
import urllib.request

url = os.environ.get("FEDWEIGHTS_HEALTH_URL", "http://127.0.0.1:9094/health")
context = None
if url.startswith("https://"):
    context = ssl.create_default_context(cafile=os.environ.get("FEDWEIGHTS_HEALTH_CA") or None)
    context.check_hostname = False
try:
    with urllib.request.urlopen(url, timeout=4, context=context) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # any failure means unhealthy
    print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
