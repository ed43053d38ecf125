"""Weight registry throughput: push/pull of a 100 MB model vs a plain file copy (same run)."""

from __future__ import annotations

from fedweights.registry.bench import run

__all__ = ["run"]
