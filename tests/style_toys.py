"""Toy transformers in the style of diffusers' own MagCache tests (``tests/hooks/test_mag_cache.py``).

Blocks without parameters that double the hidden state, so every number is known: a stack of
``n`` doubling blocks turns 10 into ``10 · 2**n``, its residual is ``10 · (2**n − 1)``, and a
skipped step returns ``x + residual``. Inputs are ``[1, 1, 1]`` tensors, so hidden and encoder
states have the same shape and only the data flow tells them apart. No timestep argument: the
runtime counts calls. Used by ``tests/test_inspect_toys.py`` (also as a ``file.py:Class`` target).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models import ModelMixin


class Doubling(torch.nn.Module):
    """No parameters: output = 2 × hidden input; the encoder state is accepted and ignored."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        return hidden_states * 2.0


class DoublingStack(ModelMixin):
    """Two parameter-free blocks in a ModuleList: 10 → 40."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([Doubling(), Doubling()])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
        return hidden_states


class Scale(torch.nn.Module):
    """A block with one parameter (for a model that also holds a parameter-free list)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((1,), 3.0))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.weight


class MixedLists(ModelMixin):
    """A parametrised block list and a list of parameter-free helpers: only the former is a block stack."""

    def __init__(self) -> None:
        super().__init__()
        self.helpers = torch.nn.ModuleList([Doubling(), Doubling()])
        self.blocks = torch.nn.ModuleList([Scale(), Scale()])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for helper in self.helpers:
            hidden_states = helper(hidden_states)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class PassEncoder(torch.nn.Module):
    """Flux-style tuple output: (2 × hidden, the encoder input itself)."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return hidden_states * 2.0, encoder_hidden_states


class OneTupleBlock(ModelMixin):
    """A single block returning a tuple; the transformer returns both states."""

    block_cls: type[torch.nn.Module] = PassEncoder

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([self.block_cls()])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> Any:
        for block in self.transformer_blocks:
            hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class ScaleBoth(torch.nn.Module):
    """(2 × hidden, 3 × encoder): with equal shapes, nothing in one call says which output is which."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        assert encoder_hidden_states is not None
        return hidden_states * 2.0, encoder_hidden_states * 3.0


class OneScaleBothBlock(OneTupleBlock):
    block_cls = ScaleBoth


def same_shapes() -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ambiguous call: hidden and encoder states both ``[1, 1, 1]``."""
    return (torch.tensor([[[10.0]]]),), {"encoder_hidden_states": torch.tensor([[[1.0]]])}


def distinct_tokens() -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs that decide it: 4 hidden tokens, 3 encoder tokens."""
    return (torch.full((1, 4, 1), 10.0),), {"encoder_hidden_states": torch.ones(1, 3, 1)}
