"""``report.html``: one self-contained page (plots embedded as PNG data URIs, inline CSS)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ..run_dir import METRICS_FILE
from .ledger import as_epsilon, format_epsilon
from .report import client_status

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.guarantee{background:#eef6ee;border-left:4px solid #3a3;padding:.8em 1em}
.warn{background:#fff4e0;border-left:4px solid #e90;padding:.6em 1em}
img{max-width:100%}code{background:#f4f4f4;padding:0 .2em}
"""


def render_html(summary: dict[str, Any], run_dir: Path) -> str:
    """The report page for a privacy summary (see ``report.summarize``); a run with user-level DP
    only has no record-level ledger, so its page has no per-client sections."""
    metrics_path = run_dir / METRICS_FILE
    rounds = json.loads(metrics_path.read_text()).get("rounds", []) if metrics_path.exists() else []
    esc, record_level = html.escape, "clients" in summary
    run_id = str(summary.get("run_id") or "")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>fedweights privacy report {esc(run_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Privacy report — run {esc(run_id or '?')}</h1>",
        f"<p>Status: <b>{esc(str(summary['status']))}</b>. {_headline(summary)}</p>",
        "<h2>What this guarantees</h2>",
        f"<p class='guarantee'>{esc(summary['guarantee'])}</p>",
        *[f"<p class='warn'>{w}</p>" for w in _warnings(summary)],
    ]
    if record_level:
        parts += ["<h2>Privacy spent per client over the rounds</h2>", _img(_epsilon_plot(summary), "epsilon per client versus round")]
    parts += [
        "<h2>Accuracy over the rounds</h2>",
        _img(_accuracy_plot(rounds), "global model accuracy versus round") if rounds else "<p>No rounds recorded.</p>",
    ]
    if record_level:
        parts += ["<h2>Clients</h2>", _clients_table(summary)]
    parts += [
        "<h2>Settings used</h2>",
        _table(["setting", "value"], [[k, _fmt(v)] for k, v in summary["settings"].items()]),
        *_user_level_section(summary),
        *(_audit_trail(summary) if record_level else [
            "<p><code>privacy.json</code> holds these numbers for machines; <code>fedweights privacy plan "
            "--user-level</code> reproduces ε from the quantities above.</p>"]),
        "</body></html>",
    ]
    return "\n".join(parts)


def _headline(summary: dict[str, Any]) -> str:
    if "clients" in summary:
        return (f"Largest ε over clients: <b>{format_epsilon(summary['epsilon_max'])}</b> at δ = "
                f"<b>{_fmt(summary['delta'])}</b> ({html.escape(summary['accountant'])} accountant).")
    user = summary["user_level"]
    return (f"User-level ε: <b>{format_epsilon(as_epsilon(user['epsilon']))}</b> at δ = <b>{_fmt(user['delta'])}</b> "
            f"after {html.escape(str(user['rounds']))} round(s) (pld accountant).")


def _warnings(summary: dict[str, Any]) -> list[str]:
    esc, clients = html.escape, summary.get("clients", {})
    warnings = [f"The run stopped early: {esc(summary['stopped_early'])}"] if summary.get("stopped_early") else []
    exhausted = [c for c, v in clients.items() if v["exhausted"]]
    if exhausted:
        warnings.append(f"Client(s) {esc(', '.join(exhausted))} reached their privacy budget and stopped training.")
    unprotected = [c for c, v in clients.items() if v["unaccounted"]]
    if unprotected:
        warnings.append(f"Client(s) {esc(', '.join(unprotected))} sent updates without DP accounting: unprotected.")
    return warnings


def _audit_trail(summary: dict[str, Any]) -> list[str]:
    esc, ledger = html.escape, summary["ledger"]
    return [
        "<h2>Audit trail</h2>",
        f"<p>Every round appended each client's (σ, q, steps) history and ε to <code>{esc(ledger['file'])}</code> "
        f"({ledger['entries']} hash-chained entries, last SHA-256 <code>{esc(ledger['last_sha256'][:16])}…</code>), "
        "written before that round's updates were aggregated. ε was recomputed by the coordinator from those histories. "
        "<code>privacy.json</code> holds these numbers for machines; <code>fedweights privacy plan</code> reproduces any of them.</p>",
    ]


def _user_level_section(summary: dict[str, Any]) -> list[str]:
    user = summary.get("user_level")
    if not user:
        return []
    return [
        "<h2>User-level (client-level) DP</h2>",
        _table(["quantity", "value"], [[k, _fmt(v)] for k, v in user.items() if not isinstance(v, (list, dict))]),
    ]


def _clients_table(summary: dict[str, Any]) -> str:
    header = ["client", "ε", "δ", "σ", "C (clip)", "q", "steps", "rounds", "examples", "batch", "budget", "mode", "status"]
    rows = []
    for client, c in summary["clients"].items():
        status = client_status(c)
        rows.append([client, format_epsilon(c["epsilon"]), _fmt(c["delta"]), _fmt(c["noise_multiplier"]), _fmt(c["max_grad_norm"]),
                     _fmt(c["sample_rate"]), c["steps"], c["rounds_participated"], _fmt(c["n_examples"]),
                     _fmt(c["batch_size"]), _fmt(c["budget"]), _fmt(c["grad_sample_mode"]), status])
    return _table(header, rows)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _epsilon_plot(summary: dict[str, Any]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    many = len(summary["clients"]) > 12
    for client, c in summary["clients"].items():
        points = sorted((int(r), as_epsilon(e)) for r, e in c["epsilon_by_round"].items())
        if not many and points:
            ax.plot(*zip(*points), marker="o", ms=3, label=f"client {client}")
    if many:  # too many lines to read: show the spread
        rows = summary["rounds"]
        xs = [r["round"] for r in rows]
        ax.plot(xs, [as_epsilon(r["epsilon_max"]) for r in rows], marker="o", ms=3, label="max over clients")
        ax.plot(xs, [as_epsilon(r["epsilon_mean"]) for r in rows], marker="o", ms=3, label="mean over clients")
    budget = summary["settings"].get("max_epsilon") or summary["settings"].get("target_epsilon")
    if budget:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:g}")
    ax.set_ylim(bottom=0)
    _round_axis(ax)
    ax.set_ylabel(f"ε so far (δ={_fmt(summary['delta'])})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _accuracy_plot(rounds: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=110)
    points = [(r["round"], r["eval_accuracy"]) for r in rounds if r.get("eval_accuracy") is not None]
    if points:
        ax.plot(*zip(*points), marker="o", ms=3, color="tab:green")
    ax.set_ylim(0, 1)
    _round_axis(ax)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    return _png(fig)


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if value == "inf":
        return "∞ (unprotected)"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
