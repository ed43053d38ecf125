"""The privacy certificate of a published model, copied from the run that produced it.

Sources, both in the run directory:

* ``privacy.json`` (the run's privacy report): top-level ``delta`` and ``accountant``;
  ``clients`` → ``{id: {epsilon, delta, noise_multiplier, max_grad_norm, sample_rate, steps}}``;
  ``rounds`` → ``[{round, epsilon_max, epsilon_mean}]``; optionally ``user_level`` →
  ``{epsilon, delta, noise_multiplier, clipping_norm, sample_rate, rounds, population}``.
* ``metrics.json``: the run config, whose ``dp.*`` and ``he.*`` settings are recorded verbatim.

The record-level ε of a model is the largest ε of any client up to its round. A number is only
copied when the report covers that round; otherwise the certificate says the ε is not known.
It never carries a number the accountant did not produce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..proto import registry_pb2 as pb

PRIVACY_FILE = "privacy.json"
METRICS_FILE = "metrics.json"
SETTINGS_SECTIONS = ("dp", "he")
CLIENT_INPUTS = ("noise_multiplier", "max_grad_norm", "sample_rate", "steps")
USER_INPUTS = ("noise_multiplier", "clipping_norm", "sample_rate", "rounds", "population")
Guarantee = pb.PrivacyCertificate.Guarantee


def unknown_certificate() -> pb.PrivacyCertificate:
    """For a payload pushed without a run: nothing is known about its training."""
    return pb.PrivacyCertificate(
        guarantee=Guarantee.UNKNOWN,
        statement="pushed without a run: how this model was trained (and whether with DP) is not recorded",
    )


def run_info(run_dir: str | Path) -> tuple[str, int, dict[str, Any]]:
    """(run id, last completed round, metrics.json) of a completed run directory."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a fedweights run directory (no {METRICS_FILE})")
    metrics = _read_json(path)
    if metrics.get("status") != "completed":
        raise UserError(
            f"run {run_dir} has status {metrics.get('status')!r}, not 'completed': its final privacy "
            "accounting is missing, so its model cannot be published with a certificate"
        )
    rounds = [r["round"] for r in metrics.get("rounds", [])]
    return str(metrics.get("run_id", "")), max(rounds, default=0), metrics


def check_run_model(path: str | Path, run_dir: str | Path) -> None:
    """Refuse to certify ``path`` with ``run_dir``'s lineage and privacy unless it is that run's
    final model: the same tensors as ``RUN/model.safetensors``, or, where the coordinator kept only
    ``model.he``, a file ``fedweights decrypt`` made from that very ``model.he``."""
    import hashlib

    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from ..flower.encryption import DECRYPTED_SHA256, ENCRYPTED_MODEL_FILE
    from ..run_dir import MODEL_FILE

    run_dir = Path(run_dir)
    plain, encrypted = run_dir / MODEL_FILE, run_dir / ENCRYPTED_MODEL_FILE
    hint = "push the run's own model, or push without --from-run (no run lineage or privacy certificate)"
    try:
        if plain.is_file():
            ours, theirs = load_file(str(path)), load_file(str(plain))
            if ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours):
                return
            raise UserError(f"{path} is not the model run {run_dir} produced (its tensors differ from {plain}): {hint}")
        if encrypted.is_file():
            with safe_open(str(path), framework="pt") as fh:
                source = (fh.metadata() or {}).get(DECRYPTED_SHA256)
            if source == hashlib.sha256(encrypted.read_bytes()).hexdigest():
                return
            raise UserError(
                f"{path} is not a decryption of {encrypted} (make one with `fedweights decrypt {encrypted} --he-key "
                f"secret.ctx --out FILE` and push FILE): {hint}"
            )
    except SafetensorError as exc:
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    raise UserError(f"{run_dir} holds no final model ({MODEL_FILE} or {ENCRYPTED_MODEL_FILE}) to check {path} against")


def certificate_for_run(run_dir: str | Path, round_: int, final: bool, metrics: dict | None = None) -> pb.PrivacyCertificate:
    """The certificate of the model a run produced after ``round_`` (``final``: its last round)."""
    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else _read_json(run_dir / METRICS_FILE)
    config = metrics.get("config", {})
    cert = pb.PrivacyCertificate(
        dp_enabled=bool(config.get("dp", {}).get("enabled", False)),
        he_enabled=bool(config.get("he", {}).get("enabled", False)),
        source=METRICS_FILE,
    )
    for section in SETTINGS_SECTIONS:
        for key, value in (config.get(section) or {}).items():
            if value is not None:
                cert.settings[f"{section}.{key}"] = json.dumps(value)
    report_path = run_dir / PRIVACY_FILE
    report = _read_json(report_path) if report_path.is_file() else None
    notes = [] if report is None else _copy_report(cert, report, round_, final)
    if cert.HasField("record_epsilon") or cert.HasField("user_epsilon"):
        cert.guarantee = Guarantee.DIFFERENTIAL_PRIVACY
        cert.source = PRIVACY_FILE
        cert.statement = "; ".join(_describe(cert) + notes)
    elif cert.dp_enabled or report is not None:
        cert.guarantee = Guarantee.UNKNOWN
        reason = notes or [f"the run has no {PRIVACY_FILE}"]
        cert.statement = f"DP was configured but no accounted ε covers round {round_}: " + "; ".join(reason)
    else:
        cert.guarantee = Guarantee.NONE
        cert.statement = "trained without differential privacy: this model carries no (ε, δ) guarantee"
    return cert


def describe_guarantee(cert: pb.PrivacyCertificate) -> str:
    """Short text for tables: ``ε=1.23 (δ=1e-05)``, ``no DP`` or ``unknown``."""
    if cert.guarantee == Guarantee.DIFFERENTIAL_PRIVACY:
        parts = []
        if cert.HasField("record_epsilon"):
            parts.append(f"ε={cert.record_epsilon:.3g} (δ={cert.record_delta:.0e})")
        if cert.HasField("user_epsilon"):
            parts.append(f"user ε={cert.user_epsilon:.3g} (δ={cert.user_delta:.0e})")
        return ", ".join(parts)
    return "no DP" if cert.guarantee == Guarantee.NONE else "unknown"


def _copy_report(cert: pb.PrivacyCertificate, report: dict, round_: int, final: bool) -> list[str]:
    """Copy ε values that cover ``round_``; return notes on what could not be copied."""
    notes: list[str] = []
    cert.accountant = str(report.get("accountant") or "")
    clients = report.get("clients") or {}
    rounds = {int(r["round"]): r for r in report.get("rounds") or [] if "round" in r}
    covered = [float(r["epsilon_max"]) for k, r in rounds.items() if k <= round_ and r.get("epsilon_max") is not None]
    if final:  # per-client totals are cumulative at the end of the run
        covered += [float(c["epsilon"]) for c in clients.values() if c.get("epsilon") is not None]
    if round_ in rounds and covered:
        cert.record_epsilon = max(covered)
        deltas = [report.get("delta")] + [c.get("delta") for c in clients.values()]
        cert.record_delta = max(float(d) for d in deltas if d is not None)
        for key in CLIENT_INPUTS:
            cert.settings[f"clients.{key}"] = _range([c.get(key) for c in clients.values()])
        cert.settings["clients.count"] = str(len(clients))
    elif rounds or clients:
        notes.append(f"{PRIVACY_FILE} has no record-level entry for round {round_}")
    user = report.get("user_level")
    if user and user.get("epsilon") is not None:
        if user.get("rounds") is None or int(user["rounds"]) >= round_:
            delta = user.get("delta", report.get("delta"))
            if delta is None:
                notes.append("user-level ε has no δ")
                return notes
            cert.user_epsilon, cert.user_delta = float(user["epsilon"]), float(delta)
            for key in USER_INPUTS:
                if user.get(key) is not None:
                    cert.settings[f"user_level.{key}"] = json.dumps(user[key])
        else:
            notes.append(f"user-level ε covers {user['rounds']} rounds, not round {round_}")
    return notes


def _describe(cert: pb.PrivacyCertificate) -> list[str]:
    parts = []
    if cert.HasField("record_epsilon"):
        parts.append(
            f"record-level DP-SGD: ε={cert.record_epsilon:.4g}, δ={cert.record_delta:g} "
            f"(max over {cert.settings.get('clients.count', '?')} clients, {cert.accountant or 'unnamed'} accountant)"
        )
    if cert.HasField("user_epsilon"):
        parts.append(f"user-level DP: ε={cert.user_epsilon:.4g}, δ={cert.user_delta:g}")
    return parts


def _range(values: list[Any]) -> str:
    """One value, or ``low..high`` when clients differ."""
    present = sorted({v for v in values if isinstance(v, (int, float))})
    if not present:
        return ""
    low, high = json.dumps(present[0]), json.dumps(present[-1])
    return low if low == high else f"{low}..{high}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
