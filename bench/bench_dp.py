"""DP-SGD cost: step time and peak memory of DP-SGD versus plain SGD, for the default digits MLP
(64 → 128 → 128 → 10, 27k parameters) and a ~1M-parameter MLP, per per-sample gradient mode:
``fused`` (fedweights' own step for stacks of Linear layers, fedweights/privacy/fused_dp_sgd.py)
and Opacus' ``hooks``, ``ghost`` and ``ew`` (torch ExpandedWeights). Target: DP ≤ 2.5x
non-private with the mode fedweights picks (``auto``).

What a "step" is, the same for plain and DP: one fixed batch of the case's size, ``zero_grad``,
forward + cross-entropy, backward, ``optimizer.step()`` (SGD, momentum 0.9; under DP the
per-example gradients are clipped, noised and scaled first). Extra rows:

- ``split_ms``: the plain and Opacus steps cut into their parts (Opacus' own pre-step calls, in
  its order);
- ``epoch_loop`` (default model only): one local epoch of the product's loops on a real digits
  client shard (360 examples): plain ``train_epochs`` over a shuffled ``DataLoader`` as clients
  train without DP, versus ``_run_epochs`` over Opacus' Poisson ``DPDataLoader`` per DP mode;
  and one whole client round (``train_private_round``: set-up, the epoch, the history);
- ``empty_batch_ok``: whether the mode survives an empty batch, which Poisson sampling draws;
- ``opacus_no_op_vmap`` / ``opacus_optimizer_only``: Opacus' ``no_op`` mode fed per-sample
  gradients from ``torch.func.vmap``, and Opacus' optimizer step alone given them (the floor of
  any per-sample-gradient method that trains through Opacus).

Step times: one process per case, short blocks of steps, the modes interleaved and repeated, the
fastest block median kept (other jobs on a shared machine only ever slow a block down). Peak
memory: one fresh process per case and mode (peak RSS on CPU, imports included, ~the same for
every mode; allocated-memory growth on CUDA).
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time

TARGET_RATIO = 2.5
CASES = {
    "default_mlp_b16": {"model": "default", "batch": 16, "threads": 1},  # the default model and batch size
    "default_mlp_b16_2threads": {"model": "default", "batch": 16, "threads": 2},
    "default_mlp_b256": {"model": "default", "batch": 256, "threads": 1},
    "mlp_1m_b256": {"model": "mlp_1m", "batch": 256, "threads": 1},  # 784·1024 + 1024·10 ≈ 1.07M
}
IN_FEATURES = {"default": 64, "mlp_1m": 784}
MODES = ("plain", "fused", "hooks", "ghost", "ew")
DP_MODES = MODES[1:]
OPACUS_MODES = MODES[2:]  # split into Opacus' own pre-step calls


def _model(case: dict):
    import torch
    from torch import nn

    from fedweights.models import MLP

    torch.manual_seed(0)
    if case["model"] == "default":
        return MLP(IN_FEATURES["default"], 10)  # what `fedweights simulate` trains on digits
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))


class _Step:
    """One model + optimizer (+ Opacus wrapping) and a fixed batch; ``run`` takes one step."""

    def __init__(self, case: dict, mode: str, batch: int | None = None) -> None:
        import warnings

        import torch
        from opacus import PrivacyEngine
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        from fedweights.privacy.fused_dp_sgd import FusedDPSGD

        warnings.filterwarnings("ignore")
        self.mode, self.device = mode, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        batch = case["batch"] if batch is None else batch
        model = _model(case).to(self.device)
        self.x = torch.randn(batch, IN_FEATURES[case["model"]], device=self.device)
        self.y = torch.randint(0, 10, (batch,), device=self.device)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.criterion, self.model = nn.CrossEntropyLoss(), model
        if mode == "fused":
            self.fused = FusedDPSGD(model, self.optimizer, 1.0, 1.0, batch or 1, torch.Generator(device=self.device))
        elif mode != "plain":
            loader = DataLoader(TensorDataset(torch.zeros(case["batch"], 1)), batch_size=case["batch"])
            private = PrivacyEngine().make_private(
                module=model, optimizer=self.optimizer, criterion=self.criterion, data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=1.0, clipping="flat", grad_sample_mode=mode)
            self.model, self.optimizer = private[0], private[1]
            if mode == "ghost":  # ghost needs Opacus' DP loss (it runs both backward passes)
                self.criterion = private[2]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def run(self) -> None:
        if self.mode == "fused":
            self.fused.step(self.x, self.y)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.criterion(self.model(self.x), self.y).backward()
            self.optimizer.step()
        self._sync()

    def split(self) -> dict[str, float]:
        """One step timed part by part (seconds); DP parts follow ``DPOptimizer.pre_step``."""
        opt, state = self.optimizer, {}
        parts = [
            ("zero_grad", lambda: opt.zero_grad(set_to_none=True)),
            ("forward_loss", lambda: state.update(loss=self.criterion(self.model(self.x), self.y))),
            ("backward", lambda: state["loss"].backward()),  # ghost: both passes and the clipping coefficients
        ]
        if self.mode == "plain":
            parts.append(("optimizer_step", opt.step))
        else:
            parts += [
                ("clip_accumulate", opt.accumulate if self.mode == "ghost" else opt.clip_and_accumulate),
                ("skip_check", lambda: state.update(skip=opt._check_skip_next_step())),
                ("noise", opt.add_noise),
                ("scale", opt.scale_grad),
                ("accountant_hook", lambda: opt.step_hook and opt.step_hook(opt)),
                ("optimizer_step", opt.original_optimizer.step),
            ]
        seconds = {}
        for name, part in parts:
            started = time.perf_counter()
            part()
            self._sync()
            seconds[name] = time.perf_counter() - started
            if state.get("skip"):
                raise RuntimeError("Opacus asked to skip this step; the split would be wrong")
        return seconds


def _empty_batch_ok(case: dict, mode: str) -> bool:
    """Does a DP step on an empty batch (Poisson sampling draws them) run in ``mode``?"""
    try:
        _Step(case, mode, batch=0).run()
        return True
    except Exception:  # noqa: BLE001 - any failure means the mode cannot train with Poisson sampling
        return False


def _opacus_no_op_steps(case: dict):
    """Reference only: Opacus' ``no_op`` mode, per-sample gradients from ``torch.func.vmap(grad)``
    handed to Opacus' optimizer (clip, noise, step); and that optimizer step alone, given the
    per-sample gradients — the floor of any per-sample-gradient method that trains through Opacus."""
    import torch
    from opacus import PrivacyEngine
    from torch.func import functional_call, grad, vmap
    from torch.utils.data import DataLoader, TensorDataset

    model = _model(case)
    x = torch.randn(case["batch"], IN_FEATURES[case["model"]])
    y = torch.randint(0, 10, (case["batch"],))
    loader = DataLoader(TensorDataset(torch.zeros(case["batch"], 1)), batch_size=case["batch"])
    gsm, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, clipping="flat", grad_sample_mode="no_op")[:3]
    named = list(gsm._module.named_parameters())

    def loss_one(params, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(gsm._module, params, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    fixed = per_sample({k: p.detach() for k, p in named}, x, y)

    def step(grads=None) -> None:
        optimizer.zero_grad(set_to_none=True)
        grads = grads or per_sample({k: p.detach() for k, p in named}, x, y)
        for k, p in named:
            p.grad_sample = grads[k]
        optimizer.step()

    return step, lambda: step({k: g.clone() for k, g in fixed.items()})  # Opacus marks tensors it consumed


def _median_ms(fn, max_runs: int = 10, budget_s: float = 0.2) -> float:
    """Median of one short block of calls (at least one, at most ``max_runs`` or ``budget_s``)."""
    times, started = [], time.perf_counter()
    while not times or (len(times) < max_runs and time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _time_modes(case: dict, repeats: int, queue) -> None:
    """Step time and its split per mode: short blocks, the modes interleaved ``repeats`` times, the
    fastest block median kept (other jobs on a shared machine only ever slow a block down)."""
    import torch

    torch.set_num_threads(case["threads"])
    steppers = {mode: _Step(case, mode) for mode in MODES}
    no_op_vmap, optimizer_only = _opacus_no_op_steps(case)
    steps = {mode: s.run for mode, s in steppers.items()} | {
        "opacus_no_op_vmap": no_op_vmap, "opacus_optimizer_only": optimizer_only}
    for fn in steps.values():
        fn()  # warm-up
    best: dict[str, float] = {}
    splits: dict[str, list[dict[str, float]]] = {mode: [] for mode in ("plain", *OPACUS_MODES)}
    for _ in range(repeats):
        for name, fn in steps.items():
            best[name] = min(best.get(name, float("inf")), _median_ms(fn))
            if name in splits:
                splits[name] += [steppers[name].split() for _ in range(5 if case["batch"] <= 64 else 1)]
    split_ms = {m: {k: round(1000 * statistics.median(s[k] for s in rows), 3) for k in rows[0]}
                for m, rows in splits.items()}
    queue.put({
        "step_ms": {name: round(t, 3) for name, t in best.items()},
        "split_ms": split_ms,
        "empty_batch_ok": {mode: _empty_batch_ok(case, mode) for mode in DP_MODES},
    })


def _time_product_loops(case: dict, repeats: int, queue) -> None:
    """Per-step time of one local epoch in the product's own loops (plain vs DP, same shard and
    batch size), the Poisson vs plain loader alone, and one whole client round."""
    import warnings

    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader

    from fedweights.config import RunConfig
    from fedweights.privacy.dp_sgd import RoundPlan, _run_epochs, make_dp_step, make_plan_loader, train_private_round
    from fedweights.task import builtin_task
    from fedweights.training import make_optimizer, train_epochs

    warnings.filterwarnings("ignore")
    torch.set_num_threads(case["threads"])
    cpu, config = torch.device("cpu"), RunConfig(batch_size=case["batch"])
    shard = builtin_task(config).client_data(0, config.clients, config).train
    n_steps = len(make_plan_loader(shard, config.batch_size))
    plan = RoundPlan(1.0, 1 / n_steps, n_steps, 1.0, config.batch_size, 1, len(shard))

    def plain_epoch_fn():
        model = _model(case)
        generator = torch.Generator().manual_seed(0)
        loader = DataLoader(shard, batch_size=config.batch_size, shuffle=True, generator=generator)
        optimizer = make_optimizer(model, config.lr, config.momentum)
        return lambda: train_epochs(model, loader, optimizer, 1, cpu)

    def dp_epoch_fn(mode: str):
        model = _model(case)
        step, loader = make_dp_step(model, make_optimizer(model, config.lr, config.momentum),
                                    make_plan_loader(shard, config.batch_size), plan, mode, torch.Generator())
        return lambda: _run_epochs(step, loader, 1, cpu)

    def drain(loader):
        return lambda: sum(1 for _ in loader)

    def plain_round() -> None:
        plain_epoch_fn()()

    def dp_round(mode: str):
        return lambda: train_private_round(_model(case), shard, plan, [], cpu, config.lr, config.momentum, mode)

    dp_modes = ("fused", "hooks", "ghost")
    epochs = {"plain": plain_epoch_fn()} | {m: dp_epoch_fn(m) for m in dp_modes}
    loaders = {"plain": drain(DataLoader(shard, batch_size=config.batch_size, shuffle=True)),
               "poisson": drain(DPDataLoader.from_data_loader(make_plan_loader(shard, config.batch_size)))}
    rounds = {"plain": plain_round} | {m: dp_round(m) for m in dp_modes}
    best: dict[str, dict[str, float]] = {"epoch": {}, "loader": {}, "round": {}}
    for _ in range(repeats):
        for kind, fns in (("epoch", epochs), ("loader", loaders), ("round", rounds)):  # interleaved
            for name, fn in fns.items():
                best[kind][name] = min(best[kind].get(name, float("inf")), _median_ms(fn, max_runs=3, budget_s=0.3))
    per_step = {m: round(t / n_steps, 3) for m, t in best["epoch"].items()}
    queue.put({
        "examples": len(shard), "steps_per_epoch": n_steps,
        "epoch_step_ms": per_step,
        "epoch_time_ratio": {m: round(best["epoch"][m] / best["epoch"]["plain"], 2) for m in dp_modes},
        "loader_only_ms_per_batch": {k: round(t / n_steps, 3) for k, t in best["loader"].items()},
        "round_ms": {m: round(t, 1) for m, t in best["round"].items()},
        "round_time_ratio": {m: round(best["round"][m] / best["round"]["plain"], 2) for m in dp_modes},
    })


def _peak_memory(case: dict, mode: str, queue) -> None:
    """Peak memory of a process that sets up ``mode`` and takes 3 steps: peak RSS on CPU (imports
    included, the same for every mode), or the growth of allocated memory on CUDA."""
    import torch

    torch.set_num_threads(case["threads"])
    step = _Step(case, mode)
    base = torch.cuda.memory_allocated() if step.device.type == "cuda" else 0
    for _ in range(3):
        step.run()
    if step.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"peak_mb": round(peak / 2**20, 1), "device": step.device.type})


def _in_fresh_process(target, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get(timeout=900)
    proc.join()
    return result


def run(repeats: int = 9) -> dict:
    """Measure every case x mode; return the JSON-ready results with ratios to plain SGD."""
    from fedweights.privacy.dp_sgd import choose_grad_sample_mode

    results = {}
    for name, case in CASES.items():
        timed = _in_fresh_process(_time_modes, case, repeats)
        times = {m: timed["step_ms"][m] for m in MODES}
        auto = choose_grad_sample_mode(_model(case))
        usable = [m for m in DP_MODES if timed["empty_batch_ok"][m]]
        row = {
            "case": case,
            "params": sum(p.numel() for p in _model(case).parameters()),
            "step_ms": times,
            "time_ratio": {m: round(times[m] / times["plain"], 2) for m in DP_MODES},
            "auto_mode": auto,
            "auto_time_ratio": round(times[auto] / times["plain"], 2),
            "fastest_usable_mode": min(usable, key=times.__getitem__),
            "fastest_usable_time_ratio": round(min(times[m] for m in usable) / times["plain"], 2),
            "empty_batch_ok": timed["empty_batch_ok"],
            "split_ms": timed["split_ms"],
            # Opacus' no_op mode fed torch.func per-sample gradients, and its optimizer step alone
            **{name: {"step_ms": timed["step_ms"][name], "time_ratio": round(timed["step_ms"][name] / times["plain"], 2)}
               for name in ("opacus_no_op_vmap", "opacus_optimizer_only")},
        }
        row["meets_target"] = row["auto_time_ratio"] <= TARGET_RATIO
        if case["threads"] == 1:  # memory does not depend on the thread count
            memory = {mode: _in_fresh_process(_peak_memory, case, mode) for mode in MODES}
            row["device"] = memory["plain"]["device"]
            row["peak_mb"] = {m: memory[m]["peak_mb"] for m in MODES}
            plain_mb = memory["plain"]["peak_mb"]
            row["extra_mb_vs_plain"] = {m: round(memory[m]["peak_mb"] - plain_mb, 1) for m in DP_MODES}
        if case["model"] == "default" and case["batch"] == 16:
            row["epoch_loop"] = _in_fresh_process(_time_product_loops, case, repeats)
        results[name] = row
    return {"benchmark": "dp", "target_time_ratio": TARGET_RATIO, "repeats": repeats,
            "meets_target": {name: row["meets_target"] for name, row in results.items()}, "results": results}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
