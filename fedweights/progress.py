"""Terminal output of a run: a line per round as it finishes, then a per-round table (rich)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .run_dir import RoundRecord


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


class RichReporter:
    """Prints progress of a federated run to a rich Console."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(soft_wrap=True)

    def run_started(self, rounds: int, clients: int, run_dir: str) -> None:
        """Announce the run."""
        self.console.print(f"[bold]fedweights[/bold]: {_count(rounds, 'round')}, {_count(clients, 'client')} → "
                           f"{escape(str(run_dir))}")

    def round_finished(self, record: RoundRecord, rounds: int) -> None:
        """One line per finished round."""
        failed = f", [yellow]{len(record.failures)} failed[/yellow]" if record.failures else ""
        self.console.print(
            f"  round {record.round}/{rounds}: train_loss {_fmt(record.train_loss)}  "
            f"eval_loss {_fmt(record.eval_loss)}  accuracy {_fmt(record.eval_accuracy)}  "
            f"({record.num_clients} clients{failed}, {record.seconds:.1f} s)"
        )

    def run_finished(self, records: Sequence[RoundRecord]) -> None:
        """The per-round table."""
        self.console.print(rounds_table(records))


def rounds_table(records: Sequence[RoundRecord]) -> Table:
    """A rich table with one row per round."""
    table = Table(title="Rounds")
    for column in ("round", "train_loss", "eval_loss", "eval_accuracy", "clients", "failed", "seconds"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            str(r.round),
            _fmt(r.train_loss),
            _fmt(r.eval_loss),
            _fmt(r.eval_accuracy),
            str(r.num_clients),
            str(len(r.failures)),
            f"{r.seconds:.2f}",
        )
    return table


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
