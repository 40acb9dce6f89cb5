"""A transformer whose forward names say nothing magsdk knows: ``forward(latents, context, timestep)``.

``context`` cannot be synthesized, so inspect / scaffold / calibrate need ``--inputs``
(tests/test_scaffold.py follows the hint the error gives).
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.proj(x)) * temb[:, None]


class BareNet(nn.Module):
    def __init__(self, channels: int = 4, context_dim: int = 8, dim: int = 16, num_layers: int = 3) -> None:
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.context_proj = nn.Linear(context_dim, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(num_layers)])
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = torch.tanh(self.time(timestep.reshape(-1, 1).float()) + self.context_proj(context).mean(1))
        x = self.proj_in(latents)
        for block in self.blocks:
            x = block(x, temb)
        return self.proj_out(x)
