"""Privacy reports of a run: ``privacy.json`` (machine-checkable), ``report.html`` (for people),
and a terminal table — all derived from the privacy ledger and ``metrics.json``.

``privacy.json`` schema (``schema`` = "fedweights.privacy/1")::

    {"schema", "run_id", "status", "stopped_early": str | null,
     "accountant": "pld" | "rdp",
     "delta": float,             # the run's δ if set, else the largest client δ
     "epsilon_max": float,       # the largest client ε ("inf" when a client is unprotected)
     "guarantee": str,           # the guarantee in words
     "settings": {noise_multiplier, target_epsilon, max_grad_norm, delta, max_epsilon, accountant,
                  rounds, local_epochs, batch_size, lr, clients},
     "clients": {"<client id>": {
         "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate",
         "steps",                 # total DP-SGD steps
         "n_examples", "batch_size", "local_epochs", "rounds_participated",
         "history": [[noise_multiplier, sample_rate, steps], ...],
         "budget": float | null, "exhausted": bool, "exhausted_round": int | null,
         "unaccounted": bool, "grad_sample_mode", "epsilon_by_round": {"<round>": ε},
         "shared_id_rounds": [int],   # rounds in which two nodes sent this client id (see the ledger's warning)
         "over_budget_rounds": [int]}},  # rounds whose update was not used: over budget per the ledger
     "rounds": [{"round", "epsilon_max", "epsilon_mean", "trained", "exhausted"}],
     "ledger": {"file", "entries", "last_sha256"},
     "user_level": {epsilon, delta, noise_multiplier, clipping_norm, sample_rate, rounds, population, ...}}
                                # only when the run had user-level DP-FedAvg (user_privacy.json)

A run with user-level DP only (``--user-dp`` without ``--dp``) has no ledger: its privacy.json
holds ``schema``, ``run_id``, ``status``, ``stopped_early``, ``accountant``, ``delta`` (the
user-level δ), ``guarantee``, ``settings`` (the ``[user_dp]`` config) and ``user_level``.

A client's ε at round r is its ε after the last round ≤ r it trained in; ``epsilon_max`` and
``epsilon_mean`` of a round are over the clients that have spent anything by then.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json
from ..run_dir import METRICS_FILE, RunDir
from .ledger import LEDGER_FILE, Ledger, LedgerError, as_epsilon, format_epsilon
from .user_level_report import USER_PRIVACY_FILE

PRIVACY_FILE = "privacy.json"
REPORT_FILE = "report.html"
SCHEMA = "fedweights.privacy/1"


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The content of privacy.json for ``run_dir`` (reads the ledger, user_privacy.json and metrics.json)."""
    run_dir = Path(run_dir)
    ledger = Ledger(run_dir)
    entries = ledger.read()
    user_file = read_user_privacy(run_dir)
    metrics = RunDir(run_dir).read_metrics() if (run_dir / METRICS_FILE).exists() else {}
    if not entries:
        used_rounds = [r for r in metrics.get("rounds", []) if r.get("num_clients")]
        if (metrics.get("config", {}).get("dp") or {}).get("enabled") and used_rounds:
            raise LedgerError(
                f"{ledger.path} holds no lines, but metrics.json records {len(used_rounds)} round(s) of this --dp run "
                "that used client updates: the ledger lost its lines; it cannot be trusted"
            )
        if user_file is None:
            raise UserError(
                f"{run_dir} has no privacy ledger ({LEDGER_FILE}) or {USER_PRIVACY_FILE}: "
                "was the run made with --dp or --user-dp?"
            )
        return _user_only_summary(metrics, user_file)
    lines = ledger.path.read_bytes().splitlines()
    _check_ledger_tail(run_dir, ledger, entries, lines)
    _check_ledger_covers_rounds(ledger, entries, metrics)
    config = metrics.get("config", {})
    dp = config.get("dp", {})
    clients: dict[str, dict[str, Any]] = {}
    for entry in entries:
        _apply(clients.setdefault(str(entry["client"]), _new_client()), entry)
    clients = dict(sorted(clients.items(), key=lambda kv: _client_sort_key(kv[0])))
    deltas = [c["delta"] for c in clients.values() if c["delta"] is not None]
    delta = dp.get("delta") or (max(deltas) if deltas else None)
    epsilons = [as_epsilon(c["epsilon"]) for c in clients.values()]
    summary = {
        "schema": SCHEMA,
        "run_id": metrics.get("run_id"),
        "status": metrics.get("status", "unknown"),
        "stopped_early": metrics.get("stopped_early"),
        "accountant": entries[-1].get("accountant") or dp.get("accountant", "pld"),
        "delta": delta,
        "epsilon_max": _finite(max(epsilons)),
        "guarantee": "",
        "settings": {
            **{k: dp.get(k) for k in ("noise_multiplier", "target_epsilon", "max_grad_norm", "delta", "max_epsilon", "accountant")},
            **{k: config.get(k) for k in ("rounds", "local_epochs", "batch_size", "lr", "clients")},
        },
        "clients": clients,
        "rounds": _rounds(clients, entries),
        "ledger": {
            "file": LEDGER_FILE,
            "entries": len(entries),
            "last_sha256": hashlib.sha256(lines[-1]).hexdigest(),
        },
    }
    summary["guarantee"] = guarantee_text(summary)
    if user_file is not None:  # a run with user-level DP-FedAvg as well
        summary["user_level"] = user_file["user_level"]
        summary["guarantee"] += " " + user_guarantee_text(user_file)
    return summary


def _check_ledger_tail(run_dir: Path, ledger: Ledger, entries: list[dict[str, Any]], lines: list[bytes]) -> None:
    """What the hash chain cannot show: an edited or dropped line at the ledger's end. The last
    line's ε must be at least what its own (σ, q, steps) history gives, and the ledger must still
    hold the line that privacy.json, as last written, sealed (its line count and sha256)."""
    from .accounting import as_entries, epsilon

    last = entries[-1]
    if last.get("history") and last.get("delta") and as_epsilon(last.get("epsilon")) != math.inf:
        recomputed = epsilon(as_entries(last["history"]), float(last["delta"]), last.get("accountant") or "pld")
        if as_epsilon(last["epsilon"]) < recomputed * (1 - 1e-9):
            raise LedgerError(
                f"{ledger.path}, line {len(entries)}: epsilon {last['epsilon']} is below the {recomputed:.6g} its own "
                "(σ, q, steps) history gives: the line was edited; the ledger cannot be trusted"
            )
    sealed_by = run_dir / PRIVACY_FILE
    if not sealed_by.exists():
        return  # no earlier report of this run (a new run archives the previous run's report)
    try:
        sealed = json.loads(sealed_by.read_text())["ledger"]
        count, digest = int(sealed["entries"]), str(sealed["last_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(
            f"{sealed_by} is damaged ({type(exc).__name__}: {exc}), so the ledger lines it sealed cannot be checked; "
            f"move it aside to rebuild the report from {LEDGER_FILE} (then checked against metrics.json only)"
        ) from None
    if len(lines) < count or hashlib.sha256(lines[count - 1]).hexdigest() != digest:
        raise LedgerError(
            f"{ledger.path} no longer holds the {count} line(s) that {PRIVACY_FILE} sealed when the run wrote it "
            f"(it has {len(lines)}; line {count} {'is missing' if len(lines) < count else 'differs'}): lines were "
            "dropped or edited; the ledger cannot be trusted"
        )


def _check_ledger_covers_rounds(ledger: Ledger, entries: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """Every update a round used was accounted before it was used: a round of metrics.json that used
    K updates needs K ledger lines of that round (fewer: lines were dropped, e.g. the ledger's end)."""
    run_id = metrics.get("run_id")
    accounted = Counter(
        int(e["round"]) for e in entries
        if e.get("status") in ("trained", "unaccounted") and not e.get("over_budget") and e.get("run") in (None, run_id)
    )
    for record in metrics.get("rounds", []):
        used = int(record.get("num_clients") or 0)
        if accounted[record["round"]] < used:
            raise LedgerError(
                f"{ledger.path} holds {accounted[record['round']]} accounted line(s) for round {record['round']}, but "
                f"metrics.json says that round used {used} client update(s): lines were dropped; the ledger cannot be trusted"
            )


def read_user_privacy(run_dir: Path) -> dict[str, Any] | None:
    """``user_privacy.json`` of a user-level DP run (None when the run had none)."""
    path = run_dir / USER_PRIVACY_FILE
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text())
        content["user_level"]["epsilon"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a valid user-level privacy file ({type(exc).__name__}: {exc})") from None
    return content


def user_guarantee_text(user_file: dict[str, Any]) -> str:
    """The user-level guarantee in plain language, with the run's numbers."""
    u = user_file["user_level"]
    return (
        f"User-level (client-level) differential privacy: (ε, δ) = ({format_epsilon(as_epsilon(u['epsilon']))}, "
        f"{u['delta']:g}) after {u['rounds']} round(s) for everything a client contributed, its whole data set: "
        f"each update clipped to L2 norm {u['clipping_norm']:g}, Gaussian noise of std "
        f"{u['noise_multiplier']:g}×{u['clipping_norm']:g} on the sum, clients Poisson-sampled with rate "
        f"{u['sample_rate']:.4g} from {u['population']}. {user_file.get('note', '')}"
    ).strip()


def _user_only_summary(metrics: dict[str, Any], user_file: dict[str, Any]) -> dict[str, Any]:
    config = metrics.get("config", {})
    user = user_file["user_level"]
    return {
        "schema": SCHEMA,
        "run_id": metrics.get("run_id"),
        "status": metrics.get("status", "unknown"),
        "stopped_early": metrics.get("stopped_early"),
        "accountant": "pld",
        "delta": user["delta"],
        "guarantee": user_guarantee_text(user_file),
        "settings": {
            **{f"user_dp.{k}": v for k, v in config.get("user_dp", {}).items() if k != "enabled"},
            **{k: config.get(k) for k in ("rounds", "local_epochs", "batch_size", "lr", "clients")},
        },
        "user_level": user,
    }


def guarantee_text(summary: dict[str, Any]) -> str:
    """The guarantee in plain language, with this run's numbers."""
    eps = as_epsilon(summary["epsilon_max"])
    unprotected = [c for c, v in summary["clients"].items() if v["unaccounted"]]
    if not math.isfinite(eps):
        return (
            f"No guarantee for client(s) {', '.join(unprotected)}: they sent updates without DP accounting, "
            "so their records must be treated as unprotected."
        )
    return (
        f"Record-level differential privacy, (ε, δ) = ({format_epsilon(eps)}, {summary['delta']:g}) or better for every client. "
        "For any single training record (one example) of a client, everything derived from that client's "
        "updates (the global models, this report, anything an attacker at the coordinator saw) is almost "
        f"equally likely whether or not the record was used: no outcome becomes more than e^ε ≤ {math.ceil(math.exp(eps) * 10) / 10:g} "
        f"times likelier, except with probability at most δ = {summary['delta']:g}. It protects individual "
        "records, not a client's data as a whole: patterns shared by many records (and a client's data "
        "distribution) can still be learned. ε was accounted with "
        f"{'privacy-loss distributions (tight)' if summary['accountant'] == 'pld' else 'Rényi DP (an upper bound)'} "
        "over every DP-SGD step each client took (Poisson sampling, per-example clipping, Gaussian noise)."
    )


def write_privacy_json(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Write privacy.json into ``run_dir``; return its path and content."""
    summary = summarize(run_dir)
    return atomic_write_json(Path(run_dir) / PRIVACY_FILE, summary), summary


def write_reports(run_dir: str | Path) -> tuple[Path, Path]:
    """Write privacy.json and report.html into ``run_dir``; return their paths."""
    from .report_html import render_html

    json_path, summary = write_privacy_json(run_dir)
    html_path = atomic_write_bytes(Path(run_dir) / REPORT_FILE, render_html(summary, Path(run_dir)).encode())
    return json_path, html_path


def privacy_table(summary: dict[str, Any]) -> Table:
    """A rich table with one row per client (a budget column only when there is a budget)."""
    table = Table(title=f"Privacy spent per client (record-level DP, {summary['accountant']} accountant)")
    with_budget = any(c["budget"] is not None for c in summary["clients"].values())
    columns = ["client", "ε", "δ", "σ", "q", "steps", "rounds", "n", *(["budget"] if with_budget else []), "status"]
    for column in columns:
        table.add_column(column, justify="left" if column == "status" else "right", min_width=len(column))
    for client, c in summary["clients"].items():
        status = client_status(c)
        cells = [client, format_epsilon(c["epsilon"]), _fmt(c["delta"], ".0e"), _fmt(c["noise_multiplier"], ".3g"),
                 _fmt(c["sample_rate"], ".3g"), str(c["steps"]), str(c["rounds_participated"]), _fmt(c["n_examples"], "d")]
        table.add_row(*cells, *([_fmt(c["budget"], "g")] if with_budget else []), status)
    return table


def client_status(client: dict[str, Any]) -> str:
    """A client's status in words, for the terminal table and report.html."""
    if client["unaccounted"]:
        status = "unprotected"
    elif client["over_budget_rounds"]:
        status = f"over budget r{client['over_budget_rounds'][0]}, update not used"
    else:
        status = f"budget reached r{client['exhausted_round']}" if client["exhausted"] else "ok"
    if client["shared_id_rounds"]:
        status += f"; id sent by 2+ nodes in r{client['shared_id_rounds'][0]}"
    return status


def print_privacy_report(run_dir: str | Path, console: Console | None = None) -> tuple[Path, Path]:
    """Write the reports and print the table and where report.html is."""
    console = console or Console()
    json_path, html_path = write_reports(run_dir)
    summary = json.loads(json_path.read_text())
    if "clients" in summary:
        console.print(privacy_table(summary))
    if summary.get("stopped_early"):
        console.print(f"[yellow]stopped early[/yellow]: {escape(summary['stopped_early'])}")
    if "clients" in summary:
        console.print(f"max epsilon {format_epsilon(summary['epsilon_max'], 4)} at delta {_fmt(summary['delta'], 'g')}")
    if summary.get("user_level"):
        u = summary["user_level"]
        console.print(
            f"user-level epsilon {format_epsilon(as_epsilon(u['epsilon']), 4)} at delta {u['delta']:g} after "
            f"{u['rounds']} round(s) (z={u['noise_multiplier']:.4g}, S={u['clipping_norm']:g}, q={u['sample_rate']:.4g})"
        )
    console.print(f"Privacy data: {escape(str(json_path.resolve()))}")
    console.print(f"Privacy report: [bold]{escape(str(html_path.resolve()))}[/bold]")
    return json_path, html_path


# ---------------------------------------------------------------- helpers


def _new_client() -> dict[str, Any]:
    keys = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "n_examples", "batch_size",
            "local_epochs", "budget", "exhausted_round", "grad_sample_mode")
    return {**dict.fromkeys(keys), "epsilon": 0.0, "steps": 0, "rounds_participated": 0, "history": [],
            "exhausted": False, "unaccounted": False, "epsilon_by_round": {}, "shared_id_rounds": [],
            "over_budget_rounds": []}


def _apply(client: dict[str, Any], entry: dict[str, Any]) -> None:
    status = entry["status"]
    if status == "trained":
        for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "n_examples",
                    "batch_size", "local_epochs", "budget", "grad_sample_mode", "history"):
            client[key] = entry.get(key)
        client["rounds_participated"] += 1
    elif status == "exhausted":
        client["exhausted"] = True
        client["exhausted_round"] = client["exhausted_round"] or entry["round"]
        client["budget"] = entry.get("budget")
    elif status == "unaccounted":
        client["unaccounted"] = True
    for flag, rounds in (("warning", "shared_id_rounds"), ("over_budget", "over_budget_rounds")):
        if entry.get(flag) and entry["round"] not in client[rounds]:
            client[rounds].append(entry["round"])
    if client["epsilon"] != "inf":
        client["epsilon"] = _finite(max(as_epsilon(client["epsilon"]), as_epsilon(entry.get("epsilon"))))
    client["steps"] = sum(int(n) for *_, n in client["history"])
    client["epsilon_by_round"][str(entry["round"])] = client["epsilon"]


def _rounds(clients: dict[str, dict[str, Any]], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in sorted({int(e["round"]) for e in entries}):
        spent = []
        for c in clients.values():
            upto = [int(k) for k in c["epsilon_by_round"] if int(k) <= r]
            if upto:
                spent.append(as_epsilon(c["epsilon_by_round"][str(max(upto))]))
        this_round = [e for e in entries if int(e["round"]) == r]
        rows.append({
            "round": r,
            "epsilon_max": _finite(max(spent)),
            "epsilon_mean": _finite(sum(spent) / len(spent)),
            "trained": sum(e["status"] == "trained" for e in this_round),
            "exhausted": sum(e["status"] == "exhausted" for e in this_round),
        })
    return rows


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if value == "inf":
        return "∞"
    return format(value, spec)


def _client_sort_key(client: str) -> tuple[int, str]:
    return (int(client), "") if client.isdigit() else (1 << 30, client)
