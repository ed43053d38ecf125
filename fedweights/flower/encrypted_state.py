"""Server state that travels encrypted with the global model under ``--he``.

The coordinator only adds ciphertexts, so any server step beyond the weighted mean runs on the
clients, after decryption, as a pure function of what they decrypt. Every payload carries the
model's tensors plus one optional *section* of the same shapes (tensor names ``section::name``):

* ``momentum`` (``fedavgm``): client k sends, weighted by n_k/N,
  ``v_k = β·v + (w − w_k)`` and ``w − η·v_k`` (w, v: the decrypted global model and momentum).
  The server step of FedAvgM is linear in the averaged weights, so the weighted sum of these is
  exactly Flower's FedAvgM step ``v' = β·v + (w − avg w_k)``, ``w' = w − η·v'``, and the new
  momentum reaches every client, sampled last round or not.
* ``update`` (``--user-dp``, see ``fedweights.privacy.distributed``): client k sends, weighted
  1/n, the previous global model w and ``(n/m)·(clip(w_k − w, S) + noise share)``. Decrypting
  gives w and the mean of the K summed sections; ``w' = w + (K/n)·mean = w + Σ/m``, the
  fixed-denominator DP-FedAvg step, whatever K is (K and n are in the aggregate's header).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord

from ..config import RunConfig
from ..crypto.codec import decrypt_envelope
from ..crypto.envelope import EnvelopeError, TensorInfo, layout_difference, layout_from_proto, read_header
from ..crypto.keys import HEKey

MOMENTUM = "momentum"
UPDATE = "update"
SEPARATOR = "::"


def section_of(config: RunConfig) -> str | None:
    """The state section a run's encrypted payloads carry (None: plain encrypted FedAvg)."""
    if config.user_dp.enabled:
        return UPDATE
    if config.strategy.name == "fedavgm":
        return MOMENTUM
    return None


def extend_layout(layout: Sequence[TensorInfo], section: str | None) -> tuple[TensorInfo, ...]:
    """The model's layout followed by the section's copy of it."""
    if section is None:
        return tuple(layout)
    return (*layout, *(TensorInfo(f"{section}{SEPARATOR}{t.name}", t.shape, t.dtype) for t in layout))


def section_in(layout: Sequence[TensorInfo]) -> str | None:
    """The section a payload layout carries, if any."""
    sections = {t.name.split(SEPARATOR, 1)[0] for t in layout if SEPARATOR in t.name}
    if not sections:
        return None
    if len(sections) > 1 or not sections <= {MOMENTUM, UPDATE}:
        raise EnvelopeError(f"unknown state sections {sorted(sections)} in the encrypted model")
    return sections.pop()


def decrypt_global(
    key: HEKey, arrays: ArrayRecord, model_layout: Sequence[TensorInfo] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decrypt an aggregate into (global model state, momentum state — empty unless ``momentum``).

    ``model_layout``: the model's own layout; a payload for a different model is refused.
    """
    header = read_header(arrays)
    got = layout_from_proto(header.layout)
    section = section_in(got)
    if model_layout is not None and (diff := layout_difference(got, extend_layout(model_layout, section))):
        raise EnvelopeError(f"the encrypted model does not fit this model: {diff}")
    state = decrypt_envelope(key, arrays)
    model = {k: v for k, v in state.items() if SEPARATOR not in k}
    part = {k.split(SEPARATOR, 1)[1]: v for k, v in state.items() if SEPARATOR in k}
    if section == UPDATE:  # w + (K/n)·mean of the K noised, clipped updates = w + Σ/m
        factor = header.num_examples / header.normaliser
        model = {k: (w.double() + factor * part[k].double()).to(w.dtype) for k, w in model.items()}
        part = {}
    return model, part


def client_payload(
    config: RunConfig,
    previous: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    cohort: int = 0,
    noise_only: bool = False,
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """What client k encrypts: ``trained`` alone, or with the run's section (see module docstring).

    ``previous``/``momentum``: the decrypted global model and momentum (empty in round 1);
    ``cohort``: clients sampled this round (``update`` only).
    """
    section = section_of(config)
    if section is None:
        return dict(trained)
    if section == MOMENTUM:
        beta, eta = config.strategy.server_momentum, config.strategy.server_lr or 1.0
        v = {k: beta * momentum[k].double() + (previous[k].double() - trained[k].double()) if k in momentum
             else previous[k].double() - trained[k].double() for k in trained}
        out = {k: (previous[k].double() - eta * v[k]).to(trained[k].dtype) for k in trained}
        return {**out, **{f"{MOMENTUM}{SEPARATOR}{k}": v[k].to(trained[k].dtype) for k in trained}}
    from ..privacy.distributed import clip_and_noise, noise_share_std
    from ..privacy.user_level import planned_guarantee

    plan = planned_guarantee(config.user_dp, config.clients, config.rounds)
    expected = plan.sample_rate * plan.population
    std = noise_share_std(plan.noise_multiplier, plan.clipping_norm, cohort)
    delta = {k: trained[k].double() - previous[k].double() for k in trained}
    noised = clip_and_noise(delta, plan.clipping_norm, std, rng or np.random.default_rng(), noise_only)
    scaled = {f"{UPDATE}{SEPARATOR}{k}": (noised[k] * (cohort / expected)).to(trained[k].dtype) for k in trained}
    return {**{k: previous[k].to(trained[k].dtype) for k in trained}, **scaled}
