"""Which modules a transformer call runs: the block lists, swapped for the length of one call.

A transformer runs its stack as ``for block in self.transformer_blocks: ...``. magsdk never
patches a block. For the length of one call it swaps the ``_modules`` of each hooked block list
(``nn.ModuleList`` / ``nn.Sequential``) for one of two layouts, and puts the originals back when
the call returns or raises:

- **compute**: the real blocks, with the first and last wrapped in an ``_Edge`` that records the
  first block's hidden input and the last block's output — what the residual needs;
- **skip**: the first list holds a single ``_Skip`` module that returns the first block's output
  format built from ``input + cached residual``; every other hooked list is empty. No block is
  entered, none of their hooks fire, and the residual is added exactly once (docs/design.md,
  "Skipping").

The module tree is unchanged between calls (state dicts, ``.to()``, offloading hooks see the real
blocks). The per-call cost is a handful of dict assignments. Under ``torch.compile`` the two
layouts are two graphs; the blocks' own code is untouched, so ``compile_repeated_blocks`` compiles
them as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from magsdk.config import BlockMetadata
from magsdk.errors import BlockLayoutError
from magsdk.runtime.layout import BlockIO
from magsdk.strategy import MagCacheStrategy


class CallGate:
    """What the modules of one call's layout share with the session: tensors in, tensors out.

    Everything here is dropped when the call ends (``clear``); between calls it holds nothing.
    """

    def __init__(self) -> None:
        self.head_input: torch.Tensor | None = None
        self.head_output: Any = None
        self.tail_output: Any = None
        #: The tensor a skipped call adds to the first block's hidden input.
        self.residual: torch.Tensor | None = None

    def clear(self) -> None:
        self.head_input = self.head_output = self.tail_output = self.residual = None


class _Edge(torch.nn.Module):
    """Runs the first and/or last block of the stack and records what the residual needs."""

    block: torch.nn.Module
    io: BlockIO
    gate: CallGate

    def __init__(self, block: torch.nn.Module, io: BlockIO, gate: CallGate, head: bool, tail: bool) -> None:
        super().__init__()
        # Not registered as a child: this module lives in a block list only during a call, and the
        # real block stays where it is in the module tree.
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "io", io)
        object.__setattr__(self, "gate", gate)
        self.head = head
        self.tail = tail

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        gate = self.gate
        if self.head:
            gate.head_input = self.io.read_hidden(args, kwargs)
        output = self.block(*args, **kwargs)
        if self.head:
            gate.head_output = output
        if self.tail:
            gate.tail_output = output
        return output


class _Skip(torch.nn.Module):
    """Stands in for the whole block stack on a skipped call: ``input + residual``, once."""

    io: BlockIO
    gate: CallGate
    strategy: MagCacheStrategy

    def __init__(self, io: BlockIO, gate: CallGate, strategy: MagCacheStrategy) -> None:
        super().__init__()
        object.__setattr__(self, "io", io)
        object.__setattr__(self, "gate", gate)
        object.__setattr__(self, "strategy", strategy)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        io = self.io
        residual = self.gate.residual
        if residual is None:
            raise BlockLayoutError(f"{io.label}: a skipped call has no cached residual to apply")
        hidden = self.strategy.apply_residual(io.read_hidden(args, kwargs), residual, io.metadata)
        return io.passthrough(hidden, io.read_encoder(args, kwargs))


Blocks = Sequence[tuple[str, torch.nn.Module, BlockMetadata]]


class BlockStack:
    """The hooked block lists of one transformer and the layouts a call can run them in."""

    def __init__(self, transformer: torch.nn.Module, blocks: Blocks, strategy: MagCacheStrategy) -> None:
        if not blocks:
            raise BlockLayoutError(f"{type(transformer).__name__}: no transformer blocks to hook")
        self.gate = CallGate()
        self.paths = [path for path, _, _ in blocks]
        head_path, head, head_meta = blocks[0]
        tail_path, tail, tail_meta = blocks[-1]
        self.head_io = BlockIO(head, head_meta, head_path)
        self.tail_io = self.head_io if tail is head else BlockIO(tail, tail_meta, tail_path)
        self.single = tail is head
        self.containers: list[torch.nn.Module] = []
        self.originals: list[dict[str, torch.nn.Module]] = []
        self.compute: list[dict[str, torch.nn.Module]] = []
        self.skip: list[dict[str, torch.nn.Module]] = []
        for container_path in _container_paths(self.paths):
            container = transformer.get_submodule(container_path)
            if not isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)):
                raise BlockLayoutError(
                    f"{type(transformer).__name__}.{container_path} is a {type(container).__name__}, not an "
                    "nn.ModuleList / nn.Sequential of blocks; magsdk caches block lists only"
                )
            self.containers.append(container)
            self.originals.append(container.__dict__["_modules"])
        self._build_layouts(head, tail, blocks, strategy)
        self.installed = False

    @property
    def roles(self) -> list[tuple[str, str]]:
        """Each hooked block with its role in a call."""
        last = len(self.paths) - 1
        return [
            (path, "head+tail" if last == 0 else "head" if i == 0 else "tail" if i == last else "middle")
            for i, path in enumerate(self.paths)
        ]

    def _build_layouts(self, head: torch.nn.Module, tail: torch.nn.Module, blocks: Blocks,
                       strategy: MagCacheStrategy) -> None:
        gate = self.gate
        edges: dict[int, torch.nn.Module] = {
            id(head): _Edge(head, self.head_io, gate, head=True, tail=self.single),
        }
        if not self.single:
            edges[id(tail)] = _Edge(tail, self.tail_io, gate, head=False, tail=True)
        skip_stub = _Skip(self.head_io, gate, strategy)
        for position, modules in enumerate(self.originals):
            self.compute.append({key: edges.get(id(module), module) for key, module in modules.items()})
            if position == 0:
                first_key = next(iter(modules))
                if modules[first_key] is not head:
                    raise BlockLayoutError(
                        f"the first hooked block {self.paths[0]} is not the first entry of its block list"
                    )
                self.skip.append({first_key: skip_stub})
            else:
                self.skip.append({})

    def enter(self, skip: bool) -> None:
        """Put the call's layout into the block lists (undone by ``leave``)."""
        layouts = self.skip if skip else self.compute
        for container, modules in zip(self.containers, layouts, strict=True):
            container.__dict__["_modules"] = modules
        self.installed = True

    def leave(self) -> None:
        """Put the real blocks back and drop the call's tensors."""
        if self.installed:
            for container, modules in zip(self.containers, self.originals, strict=True):
                container.__dict__["_modules"] = modules
            self.installed = False
        self.gate.clear()


def _container_paths(block_paths: Sequence[str]) -> list[str]:
    """``transformer_blocks.0``, ``transformer_blocks.1`` → ``transformer_blocks`` (in execution order)."""
    seen: list[str] = []
    for path in block_paths:
        container = path.rsplit(".", 1)[0]
        if container not in seen:
            seen.append(container)
    return seen
