"""A transformer whose last block drops a token: the residual x_out - x_in is not defined (tests/test_scaffold.py)."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.proj(hidden_states) * temb[:, None]


class LastBlock(Block):
    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states, temb)[:, 1:]  # drops a token: no residual x_out - x_in


class OddTransformer(nn.Module):
    def __init__(self, in_channels: int = 4, dim: int = 16, num_layers: int = 2) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_channels, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([Block(dim) for _ in range(num_layers)])
        self.last_blocks = nn.ModuleList([LastBlock(dim)])
        self.proj_out = nn.Linear(dim, in_channels)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden_states)
        temb = torch.tanh(self.time(timestep.reshape(-1, 1).float() / 1000))
        for block in self.blocks:
            x = block(x, temb)
        for block in self.last_blocks:
            x = block(x, temb)
        out = self.proj_out(x)
        return torch.cat([out[:, :1], out], dim=1)
