"""Distributed noise for user-level DP-FedAvg under encrypted aggregation (``--user-dp --he``).

The coordinator cannot add noise to a sum it cannot read, so each client adds its share: a round
that samples ``n`` clients asks each to clip its update Δ to L2 norm S and add
N(0, (z·S)² / n) per coordinate before encrypting. The ``n`` independent shares of the clients
that reply sum to N(0, (z·S)²), so the decrypted sum Σ clip(Δ_k) + noise is distributed exactly
as in central DP-FedAvg (``UserLevelDPFedAvg``) and is accounted the same way (Poisson-sampled
Gaussian, PLD). This assumes honest clients: each adds its share and keeps it secret; a client
that skips its share, or colludes with the decrypting side, weakens everyone's guarantee.

When only K < n of the sampled clients' updates make it into the sum (dropouts, rejected
updates), the sum carries only K shares, noise std z·S·sqrt(K/n): that round is accounted with
the noise multiplier z·sqrt(K/n) (:func:`effective_noise_multiplier`), so the reported ε is never
below the noise that was actually added. A round with an empty Poisson sample asks one node for
a noise-only share (its data unused, std z·S), as central DP-FedAvg releases noise in such a round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch



def noise_share_std(noise_multiplier: float, clipping_norm: float, cohort: int) -> float:
    """Std of one client's share when ``cohort`` clients were sampled: z·S/sqrt(n)."""
    if cohort < 1:
        raise ValueError(f"a round needs at least one client to carry the noise, got cohort {cohort}")
    return noise_multiplier * clipping_norm / math.sqrt(cohort)


def effective_noise_multiplier(noise_multiplier: float, summed: int, cohort: int) -> float:
    """The noise multiplier of a sum that holds ``summed`` of the ``cohort`` planned shares."""
    if not 1 <= summed <= cohort:
        raise ValueError(f"summed shares must be between 1 and the cohort {cohort}, got {summed}")
    return noise_multiplier * math.sqrt(summed / cohort)


def clip_and_noise(
    delta: Mapping[str, torch.Tensor],
    clipping_norm: float,
    share_std: float,
    rng: np.random.Generator,
    noise_only: bool = False,
) -> dict[str, torch.Tensor]:
    """``clip(Δ, S) + N(0, share_std²)`` per coordinate (float64 math, each tensor's dtype kept).

    ``noise_only``: the client's data is not used (Δ taken as 0), only its noise share is sent.
    """
    arrays = {k: t.detach().cpu().double().numpy() for k, t in delta.items()}
    clipped = {k: np.zeros_like(a) for k, a in arrays.items()} if noise_only else clip_l2(arrays, clipping_norm)
    return {
        k: torch.from_numpy(a + rng.normal(0.0, share_std, a.shape)).to(delta[k].dtype)
        for k, a in clipped.items()
    }


def clip_l2(arrays: Mapping[str, np.ndarray], clipping_norm: float) -> dict[str, np.ndarray]:
    """``arrays`` as one vector, scaled down to L2 norm ≤ ``clipping_norm`` (unchanged when within).

    Raises ValueError for NaN or infinite values: no scaling bounds them.
    """
    norm = l2_norm(arrays)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or infinite values, it cannot be clipped")
    if norm <= clipping_norm:
        return dict(arrays)
    return {k: a * (clipping_norm / norm) for k, a in arrays.items()}


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``arrays`` as one vector; finite for any finite values (no overflow of the squares)."""
    with np.errstate(over="ignore", invalid="ignore"):  # a dot product: no temporary of the squares
        squares = sum(float(flat @ flat) for flat in (np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays.values()))
    if math.isfinite(squares):
        return math.sqrt(squares)
    peak = max((float(np.max(np.abs(a))) for a in arrays.values() if np.size(a)), default=0.0)
    if not math.isfinite(peak):  # NaN (np.max propagates it) or infinite values
        return peak
    squares = sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64) / peak))) for a in arrays.values())
    return peak * math.sqrt(squares)
