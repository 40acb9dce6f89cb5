"""Reading hidden states out of a block's arguments and outputs, and building a skipped stack's output.

One ``BlockIO`` per edge block (the first and the last of the stack): it resolves argument
positions from the block's ``forward`` signature once, so the per-call work is a dict lookup or
a tuple index. The first real output is checked against the metadata once and remembered as a
*description* (container kind, length, which slots were ``None``) — never as tensors, which at
real sizes would pin tens of MB per block (docs/design.md, "Memory").
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from magsdk.config import BlockMetadata
from magsdk.errors import BlockLayoutError

_MISSING = object()


class MetadataMismatchError(BlockLayoutError):
    """The block metadata does not fit the blocks this transformer runs: no later call can go better.

    The session that meets one stops caching (``CacheSession.stop``) and adds to the message what
    to do, naming the ``magsdk inspect`` target of its transformer, which a block does not know.
    ``metadata_fix``: whether other metadata can fix it (else the model needs a strategy's own code).
    """

    def __init__(self, message: str, *, metadata_fix: bool = True) -> None:
        super().__init__(message)
        self.metadata_fix = metadata_fix


@dataclasses.dataclass(frozen=True)
class OutputShape:
    """A block output's container, described without holding any of its tensors."""

    length: int = 0
    other_tensor_slots: tuple[int, ...] = ()
    dataclass_type: type | None = None
    fields: tuple[str, ...] = ()

    @classmethod
    def of(cls, output: Any, meta: BlockMetadata) -> OutputShape:
        if isinstance(output, (tuple, list)):
            known = {meta.return_hidden_states_index, meta.return_encoder_hidden_states_index}
            others = tuple(i for i, v in enumerate(output) if i not in known and isinstance(v, torch.Tensor))
            return cls(length=len(output), other_tensor_slots=others)
        if dataclasses.is_dataclass(output) and not isinstance(output, type):
            return cls(dataclass_type=type(output), fields=tuple(f.name for f in dataclasses.fields(output)))
        return cls()


def forward_parameters(module: torch.nn.Module) -> list[inspect.Parameter]:
    """Parameters of the class's own ``forward`` (not an instance wrapper), without ``self``."""
    params = list(inspect.signature(type(module).forward).parameters.values())
    return params[1:]


class ArgumentReader:
    """Finds one named argument in ``(args, kwargs)`` of a call to a known signature."""

    def __init__(self, params: list[inspect.Parameter], name: str, owner: str) -> None:
        names = [p.name for p in params]
        self.name = name
        self.owner = owner
        self.index = names.index(name) if name in names else None
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        if self.index is None and not var_kw:
            raise MetadataMismatchError(
                f"{owner}.forward has no argument named {name!r} (its arguments: {', '.join(names)}); "
                "the block metadata does not match this block"
            )
        default = params[self.index].default if self.index is not None else inspect.Parameter.empty
        self.default: Any = None if default is inspect.Parameter.empty else default
        self.required = default is inspect.Parameter.empty

    def replaced(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The same call's arguments with this one set to ``value`` (new containers; the originals are kept)."""
        if self.name not in kwargs and self.index is not None and self.index < len(args):
            return (*args[: self.index], value, *args[self.index + 1 :]), dict(kwargs)
        return args, {**kwargs, self.name: value}

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = kwargs.get(self.name, _MISSING)
        if value is not _MISSING:
            return value
        if self.index is not None and self.index < len(args):
            return args[self.index]
        if self.required:
            raise MetadataMismatchError(
                f"{self.owner} was called without its {self.name!r} argument, which the block metadata names"
            )
        return self.default


class BlockIO:
    """Metadata-driven access to one block's hidden / encoder states."""

    def __init__(self, module: torch.nn.Module, metadata: BlockMetadata, label: str) -> None:
        self.metadata = metadata
        self.label = label
        self.cls_name = type(module).__name__
        params = forward_parameters(module)
        self.hidden = ArgumentReader(params, metadata.hidden_states_argument_name, self.cls_name)
        enc = metadata.encoder_hidden_states_argument_name
        self.encoder = ArgumentReader(params, enc, self.cls_name) if enc else None
        self.shape: OutputShape | None = None  # what the first real output looked like, without its tensors

    # -- inputs ---------------------------------------------------------------------------------
    def read_hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        value = self.hidden.read(args, kwargs)
        if not isinstance(value, torch.Tensor):
            raise MetadataMismatchError(
                f"{self.label} ({self.cls_name}) received {type(value).__name__} as "
                f"{self.metadata.hidden_states_argument_name!r}, expected a tensor; the metadata names the "
                "wrong argument"
            )
        return value

    def read_encoder(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.encoder.read(args, kwargs) if self.encoder is not None else None

    # -- outputs --------------------------------------------------------------------------------
    def extract_hidden(self, output: Any) -> torch.Tensor:
        meta = self.metadata
        kind = meta.output_kind
        try:
            if kind == "tensor":
                value = output
            elif kind in ("tuple", "list"):
                value = output[meta.return_hidden_states_index]
            elif kind == "dict":
                value = output[meta.return_hidden_states_key]
            else:
                value = getattr(output, str(meta.return_hidden_states_key))
        except (IndexError, KeyError, TypeError, AttributeError) as exc:
            raise self._mismatch(output, f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(value, torch.Tensor):
            raise self._mismatch(output, f"found {type(value).__name__} where the hidden state should be")
        return value

    def verify(self, output: Any) -> None:
        """Check once that a real output has the shape the metadata promises (never pass silently)."""
        meta = self.metadata
        expected: dict[str, type | tuple[type, ...]] = {
            "tensor": torch.Tensor,
            "tuple": tuple,
            "list": list,
            "dict": dict,
        }
        if meta.output_kind == "dataclass":
            ok = dataclasses.is_dataclass(output) or hasattr(output, str(meta.return_hidden_states_key))
        else:
            ok = isinstance(output, expected[meta.output_kind])
        if not ok:
            raise self._mismatch(output, f"it is not a {meta.output_kind}")
        self.extract_hidden(output)
        if meta.output_kind in ("tuple", "list") and meta.return_encoder_hidden_states_index is not None:
            if meta.return_encoder_hidden_states_index >= len(output):
                raise self._mismatch(
                    output, f"it has no element at return_encoder_hidden_states_index="
                    f"{meta.return_encoder_hidden_states_index}"
                )
        self.shape = OutputShape.of(output, meta)

    def observe(self, output: Any) -> None:
        """First real output: check it against the metadata and describe its container."""
        if self.shape is None:
            self.verify(output)

    def passthrough(self, hidden: torch.Tensor, encoder: Any) -> Any:
        """The block's output if it were the identity on its inputs: what a skipped stack returns."""
        meta = self.metadata
        if meta.fuses_inputs and isinstance(encoder, torch.Tensor):
            if meta.fused_sequence_order == "image_text":
                hidden = torch.cat([hidden, encoder], dim=1)
            else:
                hidden = torch.cat([encoder, hidden], dim=1)
            encoder = None
        kind = meta.output_kind
        if kind == "tensor":
            return hidden
        shape = self.shape
        if kind in ("tuple", "list"):
            h_idx, e_idx = meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
            size = max(h_idx, e_idx if e_idx is not None else 0) + 1
            if shape is not None and shape.length > size:
                if shape.other_tensor_slots:
                    raise MetadataMismatchError(
                        f"{self.label} ({self.cls_name}) returns tensors at {list(shape.other_tensor_slots)} besides "
                        "its hidden and encoder states; a skipped step cannot reproduce them. Override "
                        "apply_residual/compute_residual in a strategy, or do not cache this model.",
                        metadata_fix=False,
                    )
                size = shape.length
            items: list[Any] = [None] * size
            items[h_idx] = hidden
            if e_idx is not None:
                items[e_idx] = encoder
            return tuple(items) if kind == "tuple" else items
        values = {str(meta.return_hidden_states_key): hidden}
        if meta.return_encoder_hidden_states_key is not None:
            values[meta.return_encoder_hidden_states_key] = encoder
        if kind == "dict":
            return values
        if shape is None or shape.dataclass_type is None:
            raise BlockLayoutError(f"{self.label}: cannot build a {kind} output before one real call")
        return shape.dataclass_type(**{name: None for name in shape.fields} | values)

    def _mismatch(self, output: Any, detail: str) -> MetadataMismatchError:
        meta = self.metadata
        return MetadataMismatchError(
            f"{self.label} ({self.cls_name}) returned {_describe(output)}, which does not match its metadata "
            f"(output_kind={meta.output_kind!r}, return_hidden_states_index={meta.return_hidden_states_index}, "
            f"return_hidden_states_key={meta.return_hidden_states_key!r}): {detail}"
        )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value)
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"
