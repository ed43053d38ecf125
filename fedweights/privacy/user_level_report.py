"""``user_privacy.json``: the user-level (ε, δ) a DP-FedAvg run has spent so far.

The file is rewritten (atomically) as soon as a round's training replies arrive, counting that
round before its noised model is released, so a run that stops at any point never reports fewer
rounds than it released. Every round counts, also one whose Poisson sample was empty; a resumed
run continues the account (a round run again after the checkpoint counts again).

Under ``--he`` (distributed noise) a round whose sum holds only K of the n noise shares it asked
for is accounted at the noise multiplier z·sqrt(K/n). Its model is released (sent out for
evaluation) before K is known, since the coordinator may still reject replies while summing, so
the round is first booked with K = 1, the least noise any released sum can hold, then with K
read from the aggregate's header at the round's end: a run stopped in between over-reports,
never under-reports. ``privacy.json`` and ``report.html`` are refreshed too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from flwr.app import ArrayRecord, Message

from ..config import RunConfig
from ..errors import UserError
from ..fileio import atomic_write_json
from ..flower.round_loop import RoundHooks
from ..run_dir import RoundRecord, RunDir
from .accounting import Entry, as_entries, epsilon
from .distributed import effective_noise_multiplier
from .user_level import planned_guarantee

USER_PRIVACY_FILE = "user_privacy.json"

GUARANTEE_NOTE = (
    "Client-level (user-level) DP of every released global model: central DP-FedAvg, the server is "
    "trusted to clip and add the noise; Poisson client sampling with rate sample_rate; accounted with "
    "dp-accounting's PLD accountant. Per-round logs in metrics.json (client counts, evaluation) are "
    "operator-side and not covered."
)

DISTRIBUTED_NOTE = (
    "Client-level (user-level) DP of every released global model with distributed noise (--user-dp --he): "
    "each sampled client clips its update and adds its share N(0, (z·S)²/n) of the noise before encrypting, "
    "so the coordinator only ever sees the encrypted, noised sum. The guarantee assumes honest clients: "
    "each adds its share and keeps it secret (a client that skips its share, or colludes with whoever "
    "decrypts, weakens it for everyone), and the coordinator announces the true cohort size n. Rounds whose "
    "sum holds fewer shares than asked for are accounted with the smaller noise (history; failures are "
    "taken to be independent of the clients' data). Poisson client "
    "sampling with rate sample_rate; PLD accountant. Per-round logs in metrics.json are not covered."
)


class UserLevelPrivacyFile(RoundHooks):
    """Keeps ``user_privacy.json`` (the ``user_level`` object plus a note) up to date during a run."""

    def __init__(self, config: RunConfig, run_dir: RunDir) -> None:
        self.plan = planned_guarantee(config.user_dp, config.clients, config.rounds)
        self.distributed = config.he.enabled
        self.run_path = run_dir.path
        self.path = run_dir.path / USER_PRIVACY_FILE
        self.history: list[Entry] = self._resumed_history() if config.resume else []  # one (z, q, 1) per round
        self.lost = config.resume and not self.path.exists()  # the account of the rounds before is missing
        if self.lost and self.distributed:  # its rounds' noise may have been below nominal: unknown now
            raise UserError(
                f"cannot resume this --user-dp --he run: {self.path} is missing, so the noise its released "
                "rounds carried is unknown and the user-level account cannot be continued; start a new run"
            )
        self.cohort = 0  # clients asked for a noise share this round (the coordinator's normaliser)

    def on_train_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        """Under --he every train message asks one client for one noise share."""
        self.cohort = len(messages)

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        """Account this round before its model is released."""
        z = self.plan.noise_multiplier
        if self.distributed:  # the coordinator may still reject some of them: book the least noise (K = 1)
            usable = sum(not r.has_error() for r in replies)
            z = _effective(z, min(usable, 1), max(usable, self.cohort))
        if self.lost:
            self._restore_lost(server_round)
        self._book(server_round, z)

    def on_round_end(self, record: RoundRecord, arrays: ArrayRecord) -> None:
        """Under --he: account the round with the shares its encrypted sum really holds."""
        from ..crypto.envelope import is_encrypted, read_header

        if self.distributed and is_encrypted(arrays):
            header = read_header(arrays)
            if header.server_round == record.round:
                self.history.pop()
                self._book(record.round, _effective(self.plan.noise_multiplier, header.num_examples, header.normaliser))
        self._refresh_reports(final=False)

    def on_run_end(self, run_dir: RunDir, arrays: ArrayRecord) -> None:
        """Write privacy.json and report.html (merged with the record-level report, if any)."""
        self._refresh_reports(final=True)

    def _resumed_history(self) -> list[Entry]:
        """A resumed run keeps every round it already accounted (a round run again after the
        checkpoint counts twice: its first model may have been released before the stop)."""
        if not self.path.exists():
            return []
        user = json.loads(self.path.read_text())["user_level"]
        if "history" in user:
            return as_entries(user["history"])
        return [(float(user["noise_multiplier"]), float(user["sample_rate"]), 1)] * int(user["rounds"])

    def _restore_lost(self, server_round: int) -> None:
        """Resumed (central noise) without ``user_privacy.json``: rounds 1..server_round (this one
        may have been released before the stop) count at the nominal z, the noise they all had."""
        self.history = [(self.plan.noise_multiplier, self.plan.sample_rate, 1)] * server_round
        self.lost = False

    def _book(self, server_round: int, noise_multiplier: float) -> None:
        p = self.plan
        self.history.append((noise_multiplier, p.sample_rate, 1))
        rounds = max(server_round, len(self.history))  # rounds of the mechanism accounted
        spent = dataclasses.replace(p, rounds=rounds, epsilon=epsilon(self.history, p.delta, "pld"))
        content = {**spent.to_dict(), "noise": "distributed" if self.distributed else "central"}
        if self.distributed:
            content["history"] = [list(e) for e in self.history]
        atomic_write_json(self.path, {"user_level": content, "note": DISTRIBUTED_NOTE if self.distributed else GUARANTEE_NOTE})

    def _refresh_reports(self, final: bool) -> None:
        from .report import write_privacy_json, write_reports

        if final:
            write_reports(self.run_path)
        else:
            write_privacy_json(self.run_path)


def _effective(noise_multiplier: float, summed: int, cohort: int) -> float:
    """z of a round whose sum holds ``summed`` of ``cohort`` shares (no reply: no release, book z)."""
    if summed < 1 or cohort < 1:
        return noise_multiplier
    return effective_noise_multiplier(noise_multiplier, min(summed, cohort), cohort)
