"""Fused DP-SGD is Opacus' DP-SGD step: same clipped gradients, same noise distribution, same
divisor; it takes only the models it can train exactly, and the run refuses it for others."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedweights.config import DPConfig, RunConfig
from fedweights.errors import UserError
from fedweights.models import MLP, SmallCNN
from fedweights.privacy.dp_sgd import choose_grad_sample_mode
from fedweights.privacy.fused_dp_sgd import FusedDPSGD, fused_layers

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:Secure RNG turned off")


def batch(n: int, features: int = 64, loud: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples, the first ``loud`` scaled up so their gradients exceed the clipping norm
    (the others stay below it: the batch has clipped and unclipped examples)."""
    generator = torch.Generator().manual_seed(n)
    x = 0.05 * torch.randn(n, features, generator=generator)
    x[:loud] *= 400
    return x, torch.randint(0, 10, (n,), generator=generator)


def opacus_noiseless(model: nn.Module, clip: float, dataset_size: int, batch_size: int, lr: float = 0.0,
                     momentum: float = 0.0):
    """Opacus' DP model and optimizer (hooks mode, no noise); its divisor is int(dataset_size·q)."""
    loader = DataLoader(TensorDataset(torch.zeros(dataset_size, 1)), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    dp_model, dp_optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=True, grad_sample_mode="hooks")
    return dp_model, dp_optimizer


def opacus_grads(model: nn.Module, x, y, clip: float, dataset_size: int, batch_size: int) -> list[torch.Tensor]:
    """The gradients Opacus' DPOptimizer sets (hooks mode, no noise) for one step on (x, y)."""
    dp_model, dp_optimizer = opacus_noiseless(model, clip, dataset_size, batch_size)
    dp_optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(dp_model(x), y).backward()
    dp_optimizer.step()
    return [p.grad.clone() for p in model.parameters()]


def fused_grads(model: nn.Module, x, y, clip: float, expected_batch: int, sigma: float = 0.0, seed: int = 0):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    FusedDPSGD(model, optimizer, sigma, clip, expected_batch, torch.Generator().manual_seed(seed)).step(x, y)
    return [p.grad.clone() for p in model.parameters()]


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "default_mlp": MLP(64, 10),
        "tanh_no_bias": nn.Sequential(nn.Linear(64, 32, bias=False), nn.Tanh(), nn.Linear(32, 10)),
        "single_linear": nn.Sequential(nn.Linear(64, 10)),
    }


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("n", [16, 5, 0], ids=["batch16", "batch5", "empty"])
def test_fused_step_sets_the_gradients_opacus_sets(name, n):
    """Dataset 360, batch 16: Opacus' divisor is int(360/23) = 15; the Poisson batch drawn has n
    examples, 4 of them (or all, for n < 4) clipped, the rest not."""
    x, y = batch(n)
    reference = opacus_grads(models()[name], x, y, clip=0.7, dataset_size=360, batch_size=16)
    fused = fused_grads(models()[name], x, y, clip=0.7, expected_batch=int(360 / 23))
    assert len(fused) == len(reference)
    for ours, theirs in zip(fused, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    if n:
        assert max(float(g.abs().max()) for g in fused) > 1e-3  # not trivially zero


def test_clipped_examples_are_clipped_and_the_others_are_not():
    """Each example's clipped-gradient norm: exactly C for a loud example, its own norm for a quiet one."""
    x, y = batch(6, loud=3)
    clip = 0.7
    norms = []
    for i in range(6):
        grads = fused_grads(models()["default_mlp"], x[i:i + 1], y[i:i + 1], clip, expected_batch=1)
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    assert norms[:3] == pytest.approx([clip] * 3, rel=1e-5)
    assert all(0 < v < clip for v in norms[3:])


def test_noise_has_std_sigma_times_clip_over_the_expected_batch():
    sigma, clip, expected = 1.3, 0.5, 8
    x, y = batch(0)
    noise = torch.cat([g.flatten() for g in fused_grads(models()["default_mlp"], x, y, clip, expected, sigma)])
    assert noise.numel() == sum(p.numel() for p in MLP(64, 10).parameters())  # every coordinate
    assert float(noise.std()) * expected == pytest.approx(sigma * clip, rel=0.02)
    assert abs(float(noise.mean())) * expected < 0.02 * sigma * clip
    other = torch.cat([g.flatten() for g in fused_grads(models()["default_mlp"], x, y, clip, expected, sigma, seed=1)])
    assert not torch.equal(noise, other)  # drawn from the generator given


def test_steps_with_momentum_land_where_opacus_steps_land():
    """Three noiseless steps, SGD momentum 0.9: the weights match Opacus' after each step, and the
    loss returned is the batch's mean loss before the step."""
    x, y = batch(16)
    ours, theirs = models()["default_mlp"], models()["default_mlp"]
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    step = FusedDPSGD(ours, optimizer, 0.0, 0.7, 16, torch.Generator()).step
    dp_model, dp_optimizer = opacus_noiseless(theirs, 0.7, 256, 16, lr=0.1, momentum=0.9)  # divisor int(256/16) = 16
    for _ in range(3):
        dp_optimizer.zero_grad(set_to_none=True)
        expected_loss = nn.functional.cross_entropy(dp_model(x), y)
        expected_loss.backward()
        dp_optimizer.step()
        assert float(step(x, y)) == pytest.approx(float(expected_loss.detach()), rel=1e-5)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert float((ours[0].weight - models()["default_mlp"][0].weight).detach().abs().max()) > 1e-3  # it moved


def test_only_models_it_trains_exactly_are_fused():
    torch.manual_seed(0)
    assert fused_layers(MLP(64, 10)) is not None
    frozen = MLP(64, 10)
    frozen[0].weight.requires_grad_(False)
    hooked = MLP(64, 10)
    hooked[1].register_forward_hook(lambda *args: None)
    class Residual(nn.Sequential):
        def forward(self, x):
            return super().forward(x) + x

    refused = {
        "own_forward": Residual(nn.Linear(10, 10)),
        "cnn": SmallCNN(64, 10),
        "layer_norm": nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10)),
        "nested": nn.Sequential(nn.Sequential(nn.Linear(64, 16)), nn.ReLU(), nn.Linear(16, 10)),
        "softmax_mixes_a_row": nn.Sequential(nn.Linear(64, 16), nn.Softmax(dim=0), nn.Linear(16, 10)),
        "ends_in_activation": nn.Sequential(nn.Linear(64, 10), nn.ReLU()),
        "frozen_layer": frozen,
        "hooked_layer": hooked,
        "not_sequential": nn.Linear(64, 10),
    }
    for name, model in refused.items():
        assert fused_layers(model) is None, name
        assert choose_grad_sample_mode(model) in ("ghost", "hooks"), name
        with pytest.raises(UserError, match="fused"):
            choose_grad_sample_mode(model, "fused")
    assert choose_grad_sample_mode(MLP(64, 10), "ghost") == "ghost"  # an explicit Opacus mode is kept


def test_inputs_that_are_not_rows_of_features_are_refused():
    model = MLP(8, 10)
    step = FusedDPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 1.0, 4, torch.Generator()).step
    with pytest.raises(UserError, match="batch, features.*grad_sample_mode"):
        step(torch.randn(4, 3, 8), torch.randint(0, 10, (4,)))


def test_simulate_and_server_refuse_fused_mode_for_a_model_it_cannot_train(tmp_path):
    from fedweights.deploy.server import ServerSecurity, run_server
    from fedweights.flower.simulation import simulate

    config = RunConfig(clients=2, rounds=1, model="cnn", out=str(tmp_path / "run"),
                       dp=DPConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode="fused"))
    with pytest.raises(UserError, match="grad_sample_mode 'fused'"):
        simulate(config)
    with pytest.raises(UserError, match="grad_sample_mode 'fused'"):
        run_server(config, "127.0.0.1:1", ServerSecurity(insecure=True))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # refused before any file
