"""val_loss and the held-out split: closed form, bit-identical reruns, batch-independent noise, split by key."""
import numpy as np
import torch

from ldm.data.split import heldout_mask
from ldm.diffusion import build_objective
from ldm.metrics.val_loss import row_noise, timestep_grid, validation_loss


class _Rows:
    """A stand-in for a cache's MappedRows: gather by global row."""

    def __init__(self, tensors):
        self.tensors = tensors

    def gather(self, idx, names=None):
        return {k: v[idx] for k, v in self.tensors.items()}


class _Zero(torch.nn.Module):
    def forward(self, x, t, **kwargs):
        return torch.zeros_like(x)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, **kwargs):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000)


def _inputs(batch, gen):
    return batch["mean"].float(), {}


def _data(n=12):
    g = torch.Generator().manual_seed(0)
    return _Rows({"mean": torch.randn(n, 4, 4, 4, generator=g)})


def test_flow_val_loss_of_a_zero_model_is_the_closed_form():
    """A zero velocity predictor's loss is mean((noise - x0)^2) over rows and grid points, with the noise
    that `row_noise` defines: computed here independently, row by row."""
    data, rows = _data(), torch.arange(3, 12)
    got = validation_loss(_Zero(), build_objective("rectified_flow"), _inputs, data, rows, resolution=16, seed=5,
                          points=8, batch_size=4)
    expect = np.mean([float(((row_noise(5, 16, torch.tensor([r]), i, (4, 4, 4))[0] - data.tensors["mean"][r]) ** 2)
                            .mean()) for r in rows.tolist() for i in range(8)])
    assert abs(got["val_loss"] - expect) < 1e-6
    assert got["images"] == 9 and len(got["per_timestep"]) == 8
    assert np.allclose(got["timesteps"], [(i + 0.5) / 8 for i in range(8)])


def test_val_loss_is_bit_identical_across_evaluations_and_nearly_so_across_batch_sizes():
    torch.manual_seed(0)
    model, objective, data, rows = _Linear(), build_objective("rectified_flow"), _data(), torch.arange(12)
    kw = dict(resolution=16, seed=1, points=8)
    a = validation_loss(model, objective, _inputs, data, rows, batch_size=5, **kw)
    b = validation_loss(model, objective, _inputs, data, rows, batch_size=5, **kw)
    assert a == b  # same weights, same settings: the same bits
    c = validation_loss(model, objective, _inputs, data, rows, batch_size=12, **kw)
    assert abs(c["val_loss"] - a["val_loss"]) < 1e-6  # a row's noise does not depend on its batch


def test_ddpm_grid_is_the_timestep_index_at_each_fraction():
    assert timestep_grid(build_objective("ddpm"), 8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]


def test_heldout_split_is_a_property_of_the_key():
    keys = [f"img{i:05d}" for i in range(4000)]
    mask = heldout_mask(keys, 0.1, seed=0)
    assert 0.08 < mask.mean() < 0.12
    # order and neighbours do not matter: the same key is held out in any subset, at any position
    sub = keys[::-3]
    assert (heldout_mask(sub, 0.1, seed=0) == mask[::-3]).all()
    assert not heldout_mask(keys, 0.0, seed=0).any()
    assert (heldout_mask(keys, 0.1, seed=1) != mask).any()
