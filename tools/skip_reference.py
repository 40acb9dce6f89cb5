"""What a skipped MagCache step must return, computed without magsdk's runtime.

MagCache's definition of a skipped step (docs/design.md): no block of the stack runs, and the
stack's output is its input plus the residual ``x_out - x_in`` measured at the last computed
step, applied once. This module builds that output from the definition alone, on an unhooked
copy of the transformer, so the zoo can check the runtime against it:

1. **computed step.** The copy runs the step-0 inputs with plain torch hooks
   (``register_forward_pre_hook`` / ``register_forward_hook``) on its cached blocks: the first
   block's hidden input, the last block's hidden output, and every cached block's real output
   (its container: tuple, dict, dataclass …) are captured. The residual is
   ``tail hidden output − head hidden input`` (for a tail whose output is a fused text+image
   sequence, its image tokens).
2. **skipped step.** The copy runs the step-1 inputs with every cached block's ``forward``
   replaced by a stand-in that runs nothing: the first block returns ``its hidden input +
   residual``, every other block returns its hidden input, each in the output container the
   real block returned at step 0, with the encoder state passed through (fused into the hidden
   sequence for a block that fuses its inputs). Everything outside the blocks runs as usual.

Only the inspection report says where the hidden and encoder states are (argument names, output
slots, fused order); nothing of ``magsdk.runtime`` is used, so a bug in the runtime's skip path
shows up as a difference instead of being reproduced.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from magsdk.config import BlockMetadata, InspectionReport


class ReferenceError(Exception):
    """The reference could not be built (a block called without its hidden state, an output it cannot read …)."""


@dataclass
class _Block:
    path: str
    module: torch.nn.Module
    metadata: BlockMetadata
    signature: inspect.Signature
    template: Any = None  # the real output at the computed step


@dataclass
class _Capture:
    head_input: torch.Tensor | None = None
    tail_output: torch.Tensor | None = None
    handles: list[Any] = field(default_factory=list)


def _blocks(model: torch.nn.Module, report: InspectionReport) -> list[_Block]:
    found = []
    for group in report.block_groups:
        container = model.get_submodule(group.path)
        for index, module in enumerate(container.children()):
            found.append(_Block(f"{group.path}.{index}", module, group.metadata, inspect.signature(module.forward)))
    if not found:
        raise ReferenceError(f"{report.transformer}: the report names no cached block")
    return found


def _argument(block: _Block, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None) -> Any:
    """The value ``forward`` sees as parameter ``name`` (positional, keyword, default or inside ``**kwargs``)."""
    if name is None:
        return None
    try:
        bound = block.signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ReferenceError(f"{block.path}: cannot bind its call to {block.signature}: {exc}") from exc
    bound.apply_defaults()
    if name in bound.arguments:
        return bound.arguments[name]
    for param in block.signature.parameters.values():
        if param.kind is param.VAR_KEYWORD and name in bound.arguments.get(param.name, {}):
            return bound.arguments[param.name][name]
    return None


def _hidden_out(block: _Block, output: Any) -> torch.Tensor:
    meta = block.metadata
    if meta.output_kind == "tensor":
        value = output
    elif meta.output_kind in ("tuple", "list"):
        value = output[meta.return_hidden_states_index]
    elif meta.output_kind == "dict":
        value = output[meta.return_hidden_states_key]
    else:
        value = getattr(output, str(meta.return_hidden_states_key))
    if not isinstance(value, torch.Tensor):
        raise ReferenceError(f"{block.path} returned {type(value).__name__} where the hidden state should be")
    return value


def residual_of(tail_output: torch.Tensor, head_input: torch.Tensor, tail: BlockMetadata) -> torch.Tensor:
    """``x_out − x_in`` over the image tokens; a fused tail output holds text tokens too, on one side."""
    if tail_output.shape == head_input.shape:
        return tail_output - head_input
    tokens = head_input.shape[1]
    if tail_output.ndim == head_input.ndim and tail_output.shape[2:] == head_input.shape[2:]:
        if tail.fused_sequence_order == "text_image":
            return tail_output[:, -tokens:] - head_input
        if tail.fused_sequence_order == "image_text":
            return tail_output[:, :tokens] - head_input
    raise ReferenceError(
        f"the last block returns {tuple(tail_output.shape)} and the first block receives {tuple(head_input.shape)} "
        f"with no fused layout (fused_sequence_order={tail.fused_sequence_order!r}): no residual is defined"
    )


def _output_like(block: _Block, hidden: torch.Tensor, encoder: Any) -> Any:
    """``hidden`` (and ``encoder``) in the container the real block returned at the computed step."""
    meta = block.metadata
    if meta.fuses_inputs and isinstance(encoder, torch.Tensor):
        parts = [hidden, encoder] if meta.fused_sequence_order == "image_text" else [encoder, hidden]
        hidden, encoder = torch.cat(parts, dim=1), None
    template = block.template
    if meta.output_kind == "tensor":
        return hidden
    if meta.output_kind in ("tuple", "list"):
        items = list(template) if isinstance(template, (tuple, list)) else []
        needed = max(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index or 0) + 1
        items += [None] * (needed - len(items))
        items[meta.return_hidden_states_index] = hidden
        if meta.return_encoder_hidden_states_index is not None:
            items[meta.return_encoder_hidden_states_index] = encoder
        return tuple(items) if meta.output_kind == "tuple" else items
    values = {str(meta.return_hidden_states_key): hidden}
    if meta.return_encoder_hidden_states_key is not None:
        values[meta.return_encoder_hidden_states_key] = encoder
    if meta.output_kind == "dict":
        return {**(dict(template) if isinstance(template, dict) else {}), **values}
    if template is None or not dataclasses.is_dataclass(template):
        raise ReferenceError(f"{block.path}: no dataclass output from the computed step to fill in")
    return dataclasses.replace(template, **values)


@contextmanager
def _captured(blocks: list[_Block]) -> Iterator[_Capture]:
    """Plain torch hooks on the copy's cached blocks for the computed step; removed on exit."""
    capture = _Capture()
    head, tail = blocks[0], blocks[-1]

    def head_pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        value = _argument(head, args, kwargs, head.metadata.hidden_states_argument_name)
        if not isinstance(value, torch.Tensor):
            raise ReferenceError(f"{head.path} received {type(value).__name__} as its hidden state")
        capture.head_input = value.detach().clone()  # a block may change its input in place

    def keep_output(block: _Block) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            block.template = output
            if block is tail:
                capture.tail_output = _hidden_out(block, output).detach().clone()

        return hook

    try:
        capture.handles.append(head.module.register_forward_pre_hook(head_pre, with_kwargs=True))
        for block in blocks:
            capture.handles.append(block.module.register_forward_hook(keep_output(block), with_kwargs=True))
        yield capture
    finally:
        for handle in capture.handles:
            handle.remove()


@contextmanager
def _stand_ins(blocks: list[_Block], residual: torch.Tensor) -> Iterator[None]:
    """Every cached block's ``forward`` replaced by the pass-through a skipped step defines; restored on exit."""
    head = blocks[0]

    def stand_in(block: _Block) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            meta = block.metadata
            hidden = _argument(block, args, kwargs, meta.hidden_states_argument_name)
            if not isinstance(hidden, torch.Tensor):
                raise ReferenceError(f"{block.path} received {type(hidden).__name__} as its hidden state")
            encoder = _argument(block, args, kwargs, meta.encoder_hidden_states_argument_name)
            if block is head:
                if residual.shape != hidden.shape:
                    raise ReferenceError(
                        f"the residual {tuple(residual.shape)} does not fit the first block's input "
                        f"{tuple(hidden.shape)}"
                    )
                hidden = hidden + residual
            return _output_like(block, hidden, encoder)

        return forward

    saved = [(block.module, block.module.__dict__.get("forward")) for block in blocks]
    try:
        for block in blocks:
            block.module.forward = stand_in(block)  # type: ignore[method-assign]
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous  # type: ignore[method-assign]


@dataclass
class SkipReference:
    """The outputs of the unhooked copy: the computed step, the next step computed, and the next step skipped."""

    computed: Any
    uncached_next: Any
    skipped_next: Any
    residual: torch.Tensor


def skip_reference(
    model: torch.nn.Module,
    report: InspectionReport,
    computed_inputs: tuple[tuple[Any, ...], dict[str, Any]],
    next_inputs: tuple[tuple[Any, ...], dict[str, Any]],
) -> SkipReference:
    """Run an unhooked copy of ``model`` on ``computed_inputs``, then on ``next_inputs`` computed and skipped.

    ``model`` itself is not touched (a deep copy is made); inputs are deep-copied per call.
    """
    twin = copy.deepcopy(model)
    blocks = _blocks(twin, report)
    with torch.no_grad():
        with _captured(blocks) as capture:
            args, kwargs = copy.deepcopy(computed_inputs)
            computed = twin(*args, **kwargs)
        if capture.head_input is None or capture.tail_output is None:
            raise ReferenceError(f"the computed step did not run {blocks[0].path} and {blocks[-1].path}")
        residual = residual_of(capture.tail_output, capture.head_input, blocks[-1].metadata)
        args, kwargs = copy.deepcopy(next_inputs)
        uncached_next = twin(*args, **kwargs)
        with _stand_ins(blocks, residual):
            args, kwargs = copy.deepcopy(next_inputs)
            skipped_next = twin(*args, **kwargs)
    return SkipReference(computed, uncached_next, skipped_next, residual)
