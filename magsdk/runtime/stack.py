"""Which modules a transformer call runs: the block lists, swapped for the length of one call.

A transformer runs its stack as ``for block in self.transformer_blocks: ...``. magsdk never
patches a block. For the length of one call it swaps the ``_modules`` of each hooked block list
(``nn.ModuleList`` / ``nn.Sequential``) for one of two layouts, and puts the originals back when
the call returns or raises:

- **compute**: the real blocks, with the first and last wrapped in an ``_Edge`` that records the
  first block's hidden input and the last block's output — what the residual needs;
- **skip**: the first block's place holds a ``_Skip`` module that returns the first block's output
  format built from ``input + cached residual``; every other block's place holds a ``_Pass``
  module that returns its inputs in that block's output format. No block is entered, none of their
  hooks fire, and the residual is added exactly once. The lists keep their length, so the model's
  own code between blocks (``zip`` of interleaved lists, per-block ControlNet residuals, reshapes)
  runs as it does under diffusers' pass-through hooks (docs/design.md, "Skipping").

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


class _Stand(torch.nn.Module):
    """Stands in a block list for one call; anything else the model reads of it comes from the real block.

    Model code reads blocks' attributes outside the loop too (DiT: ``self.transformer_blocks[0].norm1``).
    """

    block: torch.nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["block"], name)


class _Edge(_Stand):
    """Runs the first and/or last block of the stack and records what the residual needs."""

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


class _Skip(_Stand):
    """Stands in for the whole block stack on a skipped call: ``input + residual``, once."""

    io: BlockIO
    gate: CallGate
    strategy: MagCacheStrategy

    def __init__(self, head: torch.nn.Module, io: BlockIO, gate: CallGate, strategy: MagCacheStrategy) -> None:
        super().__init__()
        object.__setattr__(self, "block", head)
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


class _Pass(_Stand):
    """Stands in for a block on a skipped call: its inputs, in its output format (the identity)."""

    io: BlockIO

    def __init__(self, block: torch.nn.Module, io: BlockIO) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "io", io)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        io = self.io
        return io.passthrough(io.read_hidden(args, kwargs), io.read_encoder(args, kwargs))


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
        metadata = {id(module): (path, meta) for path, module, meta in blocks}
        skip_stub = _Skip(head, self.head_io, gate, strategy)
        #: Per block list, the BlockIO of its pass-through (output shapes shared from the edge blocks once seen).
        self.pass_ios: list[tuple[BlockIO, BlockIO | None]] = []
        for modules in self.originals:
            self.compute.append({key: edges.get(id(module), module) for key, module in modules.items()})
            first = next(iter(modules.values()))
            path, meta = metadata.get(id(first), (self.paths[0], self.head_io.metadata))
            io = BlockIO(first, meta, path.rsplit(".", 1)[0])
            members = list(modules.values())
            shape_from = self.head_io if head in members else self.tail_io if tail in members else None
            self.pass_ios.append((io, shape_from))
            stub = _Pass(first, io)
            self.skip.append({key: skip_stub if module is head else stub for key, module in modules.items()})

    def share_shapes(self) -> None:
        """Once the edge blocks' outputs were seen, the pass-throughs of their lists build the same containers."""
        for io, source in self.pass_ios:
            if io.shape is None and source is not None and source.shape is not None:
                io.shape = source.shape

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
