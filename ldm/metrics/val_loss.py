"""`val_loss`: the training objective on held-out images at a fixed timestep grid with fixed noise.

Why: a Fréchet distance on a few hundred samples is noisy and biased; the loss on held-out data is the
field's cheap low-variance signal, and it tracks FID (MLPerf's text-to-image reference validates with the
mean loss over t = (i + 0.5) / 8, i = 0..7; the DiT scaling study, arXiv 2410.08184, finds loss follows
FID). Every number that is not the model is fixed: the held-out rows (`ldm.data.split`), x0 = the posterior
mean of the unflipped crop, the timestep grid, and the noise of each (row, timestep), drawn from a generator
seeded by (seed, resolution, row, grid index). Every run at one resolution therefore sees the same noisy
inputs (common random numbers), so two runs' difference is the models' alone.

Valid comparisons: runs with the same objective and parameterisation (eps-prediction DDPM vs velocity flow
losses are different quantities), the same DDPM schedule (a schedule shift changes which noise level a DDPM
timestep index means; flow times are noise levels, so flow runs compare across shifts), at one resolution.
"""
from __future__ import annotations

import torch

from ..diffusion import DDPMObjective
from ..provenance import digest


def timestep_grid(objective, points: int) -> torch.Tensor:
    """t_i = (i + 0.5) / points: flow times, or the DDPM timestep index at that fraction of the schedule."""
    frac = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    if isinstance(objective, DDPMObjective):
        return (frac * objective.num_train_timesteps).floor().long()
    return frac.float()


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(int(digest(list(parts)), 16) % (2**63))


def row_noise(seed: int, resolution: int, rows: torch.Tensor, point: int, shape: tuple) -> torch.Tensor:
    """The fixed noise of each row at grid point `point`: one generator per (row, point), so a row's noise
    does not depend on the batch it is evaluated in or on which other rows are held out."""
    return torch.stack([torch.randn(shape, generator=_generator(seed, "val_loss", resolution, int(r), point))
                        for r in rows])


@torch.no_grad()
def validation_loss(model, objective, make_inputs, data, rows: torch.Tensor, *, resolution: int, seed: int,
                    points: int, batch_size: int, device: torch.device | str = "cpu") -> dict:
    """Mean per-sample objective loss over `rows` x the grid (model in eval mode, fp32), and the mean per
    grid point. `make_inputs(batch, pad_generator) -> (x0, kwargs)` turns cached rows into model inputs
    (`ldm.recipe.validation_inputs`); `data` is the cache's `MappedRows`."""
    model.eval()
    grid = timestep_grid(objective, points)
    per_point = torch.zeros(points, dtype=torch.float64)
    for a in range(0, len(rows), batch_size):
        chunk = rows[a:a + batch_size]
        x0, kwargs = make_inputs(data.gather(chunk), _generator(seed, "val_pad", resolution, int(chunk[0])))
        x0 = x0.to(device)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        for i, t in enumerate(grid):
            noise = row_noise(seed, resolution, chunk, i, tuple(x0.shape[1:]))
            loss = objective.loss(model, x0, kwargs, None, draws=(t.repeat(len(chunk)), noise))
            per_point[i] += loss.double().sum().cpu()
    per_point /= len(rows)
    return {"val_loss": float(per_point.mean()), "per_timestep": per_point.tolist(), "timesteps": grid.tolist(),
            "images": int(len(rows))}
