"""The run's terminal lines: counts read as words, and paths print as they are (not as rich markup)."""

from __future__ import annotations

from rich.console import Console

from fedweights.progress import RichReporter


def test_the_run_line_counts_in_words_and_prints_the_path_verbatim():
    console = Console(record=True, width=200)
    reporter = RichReporter(console)
    reporter.run_started(1, 2, "/data/[site-a]/run")
    reporter.run_started(5, 1, "runs/demo")
    assert console.export_text().splitlines() == [
        "fedweights: 1 round, 2 clients → /data/[site-a]/run",
        "fedweights: 5 rounds, 1 client → runs/demo",
    ]
