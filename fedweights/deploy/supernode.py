"""Flower's ``flower-supernode`` with one fix, run by ``fedweights client``: ``python -m
fedweights.deploy.supernode ARGS`` takes the same arguments.

The fix (flwr 1.42): the SuperNode creates the ClientApp task for a message it pulls before it
fetches the message's contents. When the SuperLink then answers that the message's run is no longer
RUNNING — a message a crashed server left behind, pulled after ``fedweights server --resume`` —
Flower logs "Ignoring message" but keeps the message and its task (``RunNotRunningException`` is a
``BaseException``, past its clean-up). The task still runs, and its stale reply takes the place of
the next real one in the SuperNode's one-message-at-a-time push: that reply is never sent and the
resumed round times out for the node. Here, right after such a pull, the message and its objects
are deleted and its task is finished as failed, as Flower does when a pull fails any other way.
"""

from __future__ import annotations

from flwr.common.constant import SubStatus
from flwr.supernode import start_client_internal
from flwr.supernode.cli.flower_supernode import flower_supernode

_flower_pull_and_store = start_client_internal._pull_and_store_message  # noqa: SLF001 - the function fixed here
LEFTOVER_DETAILS = "its run is not RUNNING (a message left by a stopped run)"


def pull_and_store_without_leftovers(**kwargs):
    """Flower's ``_pull_and_store_message``; a pull that stored a message and created its task but
    returned no run (the run is not RUNNING) leaves neither behind."""
    state, pulled, created = kwargs["state"], [], []
    receive, create_task = kwargs["receive"], state.create_task

    def receive_and_remember():
        received = receive()
        if received is not None:
            pulled.append(received[0])
        return received

    def create_and_remember(*args, **task_kwargs):
        task_id = create_task(*args, **task_kwargs)
        created.append(task_id)
        return task_id

    state.create_task = create_and_remember  # this call's tasks only: the instance attribute goes below
    try:
        run_id = _flower_pull_and_store(**{**kwargs, "receive": receive_and_remember})
    finally:
        del state.create_task
    if run_id is None and pulled and created and created[0] is not None:
        message_id = pulled[0].metadata.message_id
        state.delete_messages(message_ids=[message_id])  # no-ops where Flower already cleaned up
        kwargs["object_store"].delete(message_id)
        state.finish_task(created[0], sub_status=SubStatus.FAILED, details=LEFTOVER_DETAILS)
    return run_id


def main() -> None:
    """Run ``flower-supernode`` (arguments from ``sys.argv``) with the fix above."""
    start_client_internal._pull_and_store_message = pull_and_store_without_leftovers  # noqa: SLF001
    flower_supernode()


if __name__ == "__main__":
    main()
