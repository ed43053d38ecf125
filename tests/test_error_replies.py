"""A node's error reply in metrics.json: the exception's ``Type: message``, not 2 KB of Ray traceback."""

from __future__ import annotations

from fedweights.flower.error_replies import failure_from_error

# As Flower's SuperNode (flwr/supernode/runtime/run_clientapp.py) and simulation engine
# (flwr/server/superlink/fleet/vce/vce_api.py) build it: str(type(ex)) + ":<'" + str(ex) + "'>"
RAY_TRACEBACK = (  # recorded from a simulation whose BatchNorm client drew a batch of one (cut short)
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=2412, ip=192.0.2.2, actor_id=7b27)\n"
    '  File "/work/fedweights/training.py", line 47, in train_epochs\n'
    "    loss = criterion(model(inputs), targets)\n"
    '  File "/work/.venv/lib/python3.11/site-packages/torch/nn/functional.py", line 2854, in _verify_batch_size\n'
    "    raise ValueError(\n"
    "ValueError: Expected more than 1 value per channel when training, got input size torch.Size([1, 64])\n"
    "\n"
    "The above exception was the direct cause of the following exception:\n"
    "\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=2412, ip=192.0.2.2, actor_id=7b27)\n"
    '  File "/work/.venv/lib/python3.11/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: Expected more than 1 value per channel when training, "
    "got input size torch.Size([1, 64])"
)


def flower_reason(exception_type: str, message: str) -> str:
    return f"<class '{exception_type}'>:<'{message}'>"


def test_a_simulated_clients_exception_is_its_root_cause_with_the_traceback_kept():
    failure = failure_from_error("7", flower_reason("ray.exceptions.RayTaskError(ClientAppException)", RAY_TRACEBACK))
    assert failure["node"] == "7"
    assert failure["reason"] == (
        "ValueError: Expected more than 1 value per channel when training, got input size torch.Size([1, 64])")
    assert failure["traceback"].startswith("ray::ClientAppActor.run()")  # colour codes removed
    assert "training.py\", line 47" in failure["traceback"] and "\x1b" not in failure["traceback"]


def test_a_deployed_clients_exception_reads_as_type_and_message():
    ex = MemoryError("CUDA out of memory")
    reason = str(type(ex)) + ":<'" + str(ex) + "'>"  # exactly as Flower's SuperNode builds it
    assert failure_from_error("3", reason) == {"node": "3", "reason": "MemoryError: CUDA out of memory"}


def test_other_reasons_are_kept_as_they_are():
    assert failure_from_error("2", "no reply within round_timeout") == {"node": "2", "reason": "no reply within round_timeout"}
    assert failure_from_error("2", "An exception was raised when attempting to load `ClientApp`")["reason"] == (
        "An exception was raised when attempting to load `ClientApp`")
