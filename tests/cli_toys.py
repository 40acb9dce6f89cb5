"""The toy transformer module the CLI tests write to a file and point the commands at."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator

import pytest

#: A module with one transformer-like class: a ModuleList of residual blocks between two projections.
TOY_TRANSFORMER = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.lin = nn.Linear(dim, dim)

        def forward(self, x, temb):
            return x + torch.tanh(self.lin(x + temb[:, None]))


    class ToyTransformer(nn.Module):
        def __init__(self, in_channels: int = 4, dim: int = 16, num_layers: int = 3):
            super().__init__()
            self.proj_in = nn.Linear(in_channels, dim)
            self.time = nn.Linear(1, dim)
            self.stack = nn.ModuleList([Block(dim) for _ in range(num_layers)])
            self.proj_out = nn.Linear(dim, in_channels)

        def forward(self, hidden_states, timestep):
            h = self.proj_in(hidden_states)
            temb = self.time(timestep.reshape(-1, 1).to(h.dtype))
            for block in self.stack:
                h = block(h, temb)
            return self.proj_out(h)
    '''
)


@pytest.fixture(autouse=True)
def isolated_cli_logging() -> Iterator[None]:
    """The CLI configures logging on stderr; drop its handler so it never writes into a closed capture.

    Autouse in every test module that imports it.
    """
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
