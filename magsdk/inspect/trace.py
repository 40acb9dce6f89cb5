"""Record what every transformer block receives and returns during one real forward.

Inspection works from data flow, not from names: it needs, for each block call, where each
argument came from (which output of which earlier block call, untouched or changed, or a
concatenation of several outputs). Those links are computed *as the calls happen*, at the entry
of each block, because later code may change tensors in place and because the runtime traces a
user's full-size first call, where keeping every block's activations alive would cost
gigabytes. ``keep="edges"`` keeps only what the runtime needs afterwards (each group's first
inputs and last outputs); ``keep="all"`` keeps everything for inspection and tests.

This module is shared by ``magsdk inspect`` and the runtime's first-call tracing, so it imports
nothing beyond torch and magsdk's error types.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.overrides import TorchFunctionMode

from magsdk.conventions import LATENT_ARGUMENT_NAMES, TIMESTEP_ARGUMENT_NAMES, TIMESTEP_NAME_HINTS
from magsdk.errors import UsageError
from magsdk.patching import Patches

SlotKey = int | str | None
"""Where a value sits in a block's output: tuple/list index, dict key / dataclass field, or None (bare tensor)."""

Keep = Literal["all", "edges"]
ArgForm = Literal["positional", "keyword", "varargs", "varkw", "default"]

_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
#: Torch functions that read metadata only: they neither consume a tensor's values nor make one.
_METADATA_FUNCTIONS = frozenset(
    {"__get__", "size", "dim", "numel", "__len__", "stride", "is_contiguous", "data_ptr", "element_size",
     "nelement", "is_floating_point", "get_device", "is_complex", "storage_offset"}
)

#: Transformer ``forward`` parameters that usually hold the noisy latents / the timestep (``magsdk.conventions``).
LATENT_NAMES = LATENT_ARGUMENT_NAMES
TIMESTEP_NAMES = TIMESTEP_ARGUMENT_NAMES


# -- finding block containers -----------------------------------------------------------------------
@dataclass
class BlockContainer:
    """A ModuleList / Sequential whose members are all instances of one (non-torch) block class."""

    path: str
    blocks: list[torch.nn.Module]
    block_class: str

    @property
    def count(self) -> int:
        return len(self.blocks)


def _is_torch_builtin(cls: type) -> bool:
    return cls.__module__.startswith("torch.")


def find_block_containers(model: torch.nn.Module) -> list[BlockContainer]:
    """Every list of repeated blocks, under any attribute name and at any depth.

    Only the outermost list counts (lists inside a block belong to that block); members must
    share one class that is not a plain torch layer. Lists of blocks with parameters are what
    real transformers have, and lists of parameter-free helpers (activations, reshapes) beside
    them are not blocks; so parameter-free lists are taken only when the model has no list of
    blocks with parameters at all (toy models whose blocks compute ``hidden_states * 2``).
    """
    return _block_lists(model, parametrised=True) or _block_lists(model, parametrised=False)


def _block_lists(model: torch.nn.Module, *, parametrised: bool) -> list[BlockContainer]:
    found: list[BlockContainer] = []
    for path, module in model.named_modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) == 0:
            continue
        if any(path.startswith(c.path + ".") for c in found):
            continue
        members = list(module.children())
        classes = {type(m) for m in members}
        if len(members) != len(module) or len(classes) != 1:
            continue
        cls = next(iter(classes))
        if _is_torch_builtin(cls) or parametrised != any(True for _ in members[0].parameters()):
            continue
        found.append(BlockContainer(path=path, blocks=members, block_class=cls.__name__))
    return found


# -- what a block returned ----------------------------------------------------------------------------
def output_slots(output: Any) -> tuple[str, dict[SlotKey, Any]]:
    """The container kind of a block output and its addressable values."""
    if output is None:
        return "none", {}
    if isinstance(output, torch.Tensor):
        return "tensor", {None: output}
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return "dataclass", {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    if isinstance(output, tuple):
        return "tuple", dict(enumerate(output))
    if isinstance(output, list):
        return "list", dict(enumerate(output))
    if isinstance(output, Mapping):
        return "dict", {k: v for k, v in output.items() if isinstance(k, str)}
    return "other", {}


def tokens_of(shape: tuple[int, ...]) -> int | None:
    """Number of tokens in a ``[B, ..., D]`` tensor (``N`` of ``[B, N, D]``; ``N`` of an unbatched ``[N, D]``)."""
    if len(shape) >= 3:
        return math.prod(shape[1:-1])
    if len(shape) == 2:
        return shape[0]
    return None


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if value is None:
        return "None"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(v) for v in value)})"
    return type(value).__name__


# -- links between calls --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One output value of an earlier block call."""

    call: int  # BlockCall.order of the producing call
    slot: SlotKey
    #: "same": the very tensor object; "equal": another tensor with equal values;
    #: "inplace": the same object, but changed in place after the block returned;
    #: "other": a part of a concatenation that is no block's output (``call`` is -1).
    how: Literal["same", "equal", "inplace", "other"] = "same"


@dataclass(frozen=True)
class Link:
    """Where one argument came from: one output, or the concatenation of several along dim 1."""

    parts: tuple[Source, ...]

    @property
    def exact(self) -> bool:
        return all(p.how != "inplace" for p in self.parts)

    @property
    def known_parts(self) -> tuple[Source, ...]:
        return tuple(p for p in self.parts if p.how != "other")

    @property
    def is_concat(self) -> bool:
        return len(self.parts) > 1


@dataclass(frozen=True)
class Near:
    """An argument with the shape of an earlier output but other values: something ran between blocks."""

    source: Source
    max_abs_diff: float
    rel_diff: float
    #: How many leading / trailing tokens (dim 1) are nevertheless exactly equal.
    equal_prefix: int = 0
    equal_suffix: int = 0


@dataclass
class BlockCall:
    """One call of one block, summarised (tensors are dropped once they are no longer needed)."""

    order: int
    group: str
    index: int
    block_class: str
    params: list[str]
    forms: dict[str, ArgForm]
    shapes: dict[str, tuple[int, ...] | None]  # tensor arguments' shapes; None for None
    values: dict[str, Any] | None
    output_kind: str = "none"
    output_shapes: dict[SlotKey, tuple[int, ...] | None] = field(default_factory=dict)
    output_versions: dict[SlotKey, int] = field(default_factory=dict)
    output: Any = None
    links: dict[str, Link] = field(default_factory=dict)
    near: dict[str, Near] = field(default_factory=dict)
    #: Argument names concatenated by a ``torch.cat`` inside the block, in order (fusing blocks).
    cats: list[tuple[str, ...]] = field(default_factory=list)
    #: Per argument: the transformer inputs its value derives from (through code outside blocks).
    taint: dict[str, frozenset[str]] = field(default_factory=dict)
    #: Output slots whose value was used by code outside any block after this call returned.
    used_outside: set[SlotKey] = field(default_factory=set)

    @property
    def path(self) -> str:
        return f"{self.group}.{self.index}"


@dataclass
class Trace:
    """Everything recorded in one forward of a transformer."""

    transformer: str
    containers: list[BlockContainer]
    calls: list[BlockCall]
    inputs: dict[str, tuple[int, ...] | None]  # the transformer's own tensor arguments
    input_forms: dict[str, ArgForm]
    latent_name: str | None
    timestep_name: str | None
    patch_sizes: list[int]
    #: Shapes of the tensors the transformer returned.
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)

    def group_calls(self, group: str) -> list[BlockCall]:
        return [c for c in self.calls if c.group == group]

    def groups_in_order(self) -> list[str]:
        seen: dict[str, None] = {}
        for call in self.calls:
            seen.setdefault(call.group, None)
        return list(seen)

    def container(self, path: str) -> BlockContainer:
        return next(c for c in self.containers if c.path == path)


# -- binding arguments to names -----------------------------------------------------------------------
def forward_signature(module: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return None


def bind_arguments(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, ArgForm]]:
    """Name every argument of a call as the block's ``forward`` sees it (``self`` left out)."""
    values: dict[str, Any] = {}
    forms: dict[str, ArgForm] = {}
    if signature is None:
        for i, value in enumerate(args):
            values[f"*args[{i}]"], forms[f"*args[{i}]"] = value, "varargs"
        for name, value in kwargs.items():
            values[name], forms[name] = value, "varkw"
        return values, forms
    params = list(signature.parameters.values())[1:]
    position = 0
    for param in params:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            if position < len(args):
                values[param.name], forms[param.name] = args[position], "positional"
                position += 1
            elif param.name in kwargs:
                values[param.name], forms[param.name] = kwargs[param.name], "keyword"
            elif param.default is not param.empty:
                values[param.name], forms[param.name] = param.default, "default"
        elif param.kind is param.VAR_POSITIONAL:
            for i, value in enumerate(args[position:]):
                values[f"*{param.name}[{i}]"], forms[f"*{param.name}[{i}]"] = value, "varargs"
            position = len(args)
        elif param.kind is param.KEYWORD_ONLY:
            if param.name in kwargs:
                values[param.name], forms[param.name] = kwargs[param.name], "keyword"
            elif param.default is not param.empty:
                values[param.name], forms[param.name] = param.default, "default"
        else:  # VAR_KEYWORD
            for name, value in kwargs.items():
                if name not in values:
                    values[name], forms[name] = value, "varkw"
    for i, value in enumerate(args[position:]):  # more positional arguments than the signature has
        values[f"*args[{i}]"], forms[f"*args[{i}]"] = value, "varargs"
    return values, forms


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


# -- the tracer -------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    call: BlockCall
    ids: dict[int, str]


def tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in a value, looking two levels into lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item, depth + 1)


class _IdMap:
    """id(tensor) → value, robust to ids being reused after a tensor is freed."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}

    def get(self, tensor: torch.Tensor) -> Any:
        entry = self._items.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def set(self, tensor: torch.Tensor, value: Any) -> None:
        try:
            self._items[id(tensor)] = (weakref.ref(tensor), value)
        except TypeError:  # a tensor type that cannot be weakly referenced: not tracked
            pass


class _Watch(TorchFunctionMode):
    """Watches torch calls: ``torch.cat`` on a block's own arguments (a block that fuses its inputs), and,
    outside blocks, which transformer inputs each tensor derives from and which block outputs are used."""

    def __init__(self, tracer: BlockTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        frames = self.tracer._frames
        if frames:
            if len(frames) == 1 and func in _CAT_FUNCTIONS:
                tensors = args[0] if args else kwargs.get("tensors", ())
                frame = frames[0]
                if isinstance(tensors, (list, tuple)):
                    names = tuple(frame.ids.get(id(t), "") for t in tensors)
                    if sum(1 for n in names if n) >= 2:
                        frame.call.cats.append(names)
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        if getattr(func, "__name__", "") not in _METADATA_FUNCTIONS:
            self.tracer._glue(func, args, kwargs, result)
        return result


class BlockTracer:
    """Wraps every block of every container; ``with`` restores the original forwards, even on error."""

    def __init__(self, model: torch.nn.Module, containers: list[BlockContainer], keep: Keep = "all") -> None:
        self.model = model
        self.containers = containers
        self.keep = keep
        self.calls: list[BlockCall] = []
        self._frames: list[_Frame] = []
        self._patches = Patches("magsdk block tracing")
        self._last_of_group: dict[str, BlockCall] = {}
        self._first_of_group: set[int] = set()
        self._signatures: dict[type, inspect.Signature | None] = {}
        self._taint = _IdMap()  # tensor -> frozenset of transformer input names
        self._produced = _IdMap()  # block output tensor -> (call, slot)

    def seed(self, inputs: Mapping[str, Any]) -> None:
        """Mark each transformer input's tensors as deriving from that input."""
        for name, value in inputs.items():
            for tensor in tensors_in(value):
                self._taint.set(tensor, frozenset({name}))

    def _taint_of(self, value: Any) -> frozenset[str]:
        found: frozenset[str] = frozenset()
        for tensor in tensors_in(value):
            found |= self._taint.get(tensor) or frozenset()
        return found

    def _glue(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        """Code outside any block ran ``func``: propagate input lineage and note used block outputs."""
        inputs = [*tensors_in(args), *tensors_in(kwargs)]
        taint: frozenset[str] = frozenset()
        for tensor in inputs:
            taint |= self._taint.get(tensor) or frozenset()
            produced = self._produced.get(tensor)
            if produced is not None:
                produced[0].used_outside.add(produced[1])
        if not taint:
            return
        for tensor in tensors_in(result):
            self._taint.set(tensor, taint | (self._taint.get(tensor) or frozenset()))
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and (name.endswith("_") or name.startswith("__i")
                                                            or name == "__setitem__"):
            self._taint.set(args[0], taint | (self._taint.get(args[0]) or frozenset()))

    # -- install / restore ------------------------------------------------------------------------
    def __enter__(self) -> BlockTracer:
        seen: set[int] = set()
        try:
            for container in self.containers:
                for index, block in enumerate(container.blocks):
                    if id(block) in seen:
                        continue
                    seen.add(id(block))
                    self._patches.patch(block, "forward", self._wrap(container.path, index, block, block.forward))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
        self._frames.clear()

    def _restore(self) -> None:
        self._patches.restore()

    def _wrap(self, group: str, index: int, block: torch.nn.Module, original: Any) -> Any:
        tracer = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            if tracer._frames:  # a block called from inside another block is part of that block
                return original(*args, **kwargs)
            call = tracer._enter(group, index, block, args, kwargs)
            tracer._frames.append(_Frame(call, {id(v): k for k, v in (call.values or {}).items()
                                                if isinstance(v, torch.Tensor)}))
            try:
                output = original(*args, **kwargs)
            finally:
                tracer._frames.pop()
            tracer._exit(call, output)
            return output

        return forward

    # -- per call -------------------------------------------------------------------------------------
    def _signature(self, block: torch.nn.Module) -> inspect.Signature | None:
        cls = type(block)
        if cls not in self._signatures:
            self._signatures[cls] = forward_signature(block)
        return self._signatures[cls]

    def _enter(
        self, group: str, index: int, block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> BlockCall:
        signature = self._signature(block)
        values, forms = bind_arguments(signature, args, kwargs)
        params = [p for p in (list(signature.parameters)[1:] if signature else [])]
        call = BlockCall(
            order=len(self.calls),
            group=group,
            index=index,
            block_class=type(block).__name__,
            params=params,
            forms=forms,
            shapes={k: _shape(v) for k, v in values.items() if v is None or isinstance(v, torch.Tensor)},
            values=values,
        )
        for name, value in values.items():
            taint = self._taint_of(value)
            if taint:
                call.taint[name] = taint
        previous = self._last_of_group.get(group)
        producers = [previous] if previous is not None else []
        if previous is None or (self.calls and self.calls[-1].group != group):
            others = sorted(
                (c for g, c in self._last_of_group.items() if g != group), key=lambda c: c.order, reverse=True
            )
            producers.extend(others)
        self._link(call, producers)
        if previous is None:
            self._first_of_group.add(call.order)
        self.calls.append(call)
        return call

    def _exit(self, call: BlockCall, output: Any) -> None:
        kind, slots = output_slots(output)
        call.output_kind = kind
        call.output_shapes = {k: _shape(v) for k, v in slots.items() if v is None or isinstance(v, torch.Tensor)}
        call.output_versions = {k: v._version for k, v in slots.items() if isinstance(v, torch.Tensor)}
        call.output = output
        lineage = frozenset().union(*call.taint.values()) if call.taint else frozenset()
        for slot, value in slots.items():
            for tensor in tensors_in(value):
                self._produced.set(tensor, (call, slot))
                if lineage:
                    self._taint.set(tensor, lineage)
        previous = self._last_of_group.get(call.group)
        self._last_of_group[call.group] = call
        if self.keep == "edges":  # keep each group's first inputs and outputs and its latest outputs
            if call.order not in self._first_of_group:
                call.values = None
            if previous is not None and previous.order not in self._first_of_group:
                previous.output = None

    def _link(self, call: BlockCall, producers: list[BlockCall]) -> None:
        if not producers or call.values is None:
            return
        candidates: list[tuple[Source, torch.Tensor, int]] = []
        for producer in producers:
            _, slots = output_slots(producer.output)
            for slot, value in slots.items():
                if isinstance(value, torch.Tensor):
                    version = producer.output_versions.get(slot, value._version)
                    candidates.append((Source(producer.order, slot), value, version))
        if not candidates:
            return
        for name, value in call.values.items():
            if not isinstance(value, torch.Tensor) or value.ndim < 2:
                continue
            link = _direct_link(value, candidates) or _concat_link(value, candidates) or _edge_link(value, candidates)
            if link is not None:
                call.links[name] = link
                continue
            near = _nearest(value, candidates)
            if near is not None:
                call.near[name] = near


def _direct_link(value: torch.Tensor, candidates: list[tuple[Source, torch.Tensor, int]]) -> Link | None:
    for source, tensor, version in candidates:
        if tensor is value:
            how: Literal["same", "inplace"] = "same" if tensor._version == version else "inplace"
            return Link((dataclasses.replace(source, how=how),))
    for source, tensor, _ in candidates:
        if same_values(tensor, value):
            return Link((dataclasses.replace(source, how="equal"),))
    return None


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype, device and values (another tensor object may carry the same state)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _concat_link(value: torch.Tensor, candidates: list[tuple[Source, torch.Tensor, int]]) -> Link | None:
    """``value == cat(parts, dim=1)`` for two or three earlier outputs (e.g. [text; image])."""
    if value.ndim < 3:
        return None
    usable = [
        (s, t)
        for s, t, _ in candidates
        if t.ndim == value.ndim
        and t.shape[0] == value.shape[0]
        and t.shape[2:] == value.shape[2:]
        and 0 < t.shape[1] < value.shape[1]
        and t.dtype == value.dtype
        and t.device == value.device
    ]

    def search(offset: int, depth: int) -> list[Source] | None:
        if offset == value.shape[1]:
            return []
        if depth == 3:
            return None
        for source, tensor in usable:
            end = offset + tensor.shape[1]
            if end <= value.shape[1] and torch.equal(value[:, offset:end], tensor):
                rest = search(end, depth + 1)
                if rest is not None:
                    how: Literal["same", "equal"] = "same"
                    return [dataclasses.replace(source, how=how), *rest]
        return None

    parts = search(0, 0)
    return Link(tuple(parts)) if parts is not None and len(parts) > 1 else None


def _edge_link(value: torch.Tensor, candidates: list[tuple[Source, torch.Tensor, int]]) -> Link | None:
    """``value`` starts or ends with an earlier output, the rest being something else ([gist; image] …)."""
    if value.ndim < 3:
        return None
    other = Source(-1, None, "other")
    for source, tensor, _ in candidates:
        if not (
            tensor.ndim == value.ndim
            and tensor.shape[0] == value.shape[0]
            and tensor.shape[2:] == value.shape[2:]
            and 0 < tensor.shape[1] < value.shape[1]
            and tensor.dtype == value.dtype
            and tensor.device == value.device
        ):
            continue
        n = tensor.shape[1]
        if torch.equal(value[:, value.shape[1] - n :], tensor):
            return Link((other, dataclasses.replace(source, how="equal")))
        if torch.equal(value[:, :n], tensor):
            return Link((dataclasses.replace(source, how="equal"), other))
    return None


def _nearest(value: torch.Tensor, candidates: list[tuple[Source, torch.Tensor, int]]) -> Near | None:
    best: Near | None = None
    for source, tensor, _ in candidates:
        if tensor.shape != value.shape or tensor.device != value.device or not tensor.is_floating_point():
            continue
        a, b = value.detach().float(), tensor.detach().float()
        diff = (a - b).abs()
        rel = float(torch.linalg.vector_norm(a - b) / (torch.linalg.vector_norm(b) + 1e-12))
        if best is None or rel < best.rel_diff:
            prefix = suffix = 0
            if value.ndim >= 3:
                same = (diff == 0).flatten(2).all(dim=2).all(dim=0).tolist()  # per token
                prefix = next((i for i, ok in enumerate(same) if not ok), len(same))
                suffix = next((i for i, ok in enumerate(reversed(same)) if not ok), len(same))
            best = Near(source, float(diff.max()), rel, prefix, suffix)
    return best


# -- tracing one forward ------------------------------------------------------------------------------
def _patch_sizes(model: torch.nn.Module) -> list[int]:
    config = getattr(model, "config", None)
    sizes: list[int] = []
    if config is None:
        return sizes
    getter = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    for key in ("patch_size", "patch_size_t", "temporal_patch_size", "spatial_patch_size"):
        value = getter(key, None)
        if isinstance(value, int):
            sizes.append(value)
        elif isinstance(value, (list, tuple)):
            sizes.extend(int(v) for v in value if isinstance(v, int))
    return sizes


def describe_inputs(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, ArgForm], str | None, str | None]:
    """The transformer's bound arguments, and which of them hold the latents and the timestep."""
    values, forms = bind_arguments(forward_signature(model), args, kwargs)
    tensors = {k: t for k, v in values.items() for t in list(tensors_in(v))[:1]}  # a list of latents: the first
    latent = next((n for n in LATENT_NAMES if n in tensors and tensors[n].ndim >= 3), None)
    if latent is None:
        latent = next((n for n, v in tensors.items() if v.is_floating_point() and v.ndim >= 3), None)
    timestep = next((n for n in TIMESTEP_NAMES if n in values and values[n] is not None), None)
    if timestep is None:
        timestep = next(
            (n for n, v in values.items()
             if any(h in n for h in TIMESTEP_NAME_HINTS) and isinstance(v, (torch.Tensor, float))),
            None,
        )
    return values, forms, latent, timestep


@contextmanager
def tracing(
    model: torch.nn.Module,
    containers: list[BlockContainer],
    keep: Keep = "all",
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
) -> Iterator[BlockTracer]:
    """Blocks wrapped for recording while inside; original forwards restored on exit, even on error.

    ``inputs`` (the transformer's ``(args, kwargs)``) lets the trace tell which block arguments
    derive from which transformer input (the latents versus the text, for instance).
    """
    tracer = BlockTracer(model, containers, keep)
    if inputs is not None:
        tracer.seed(bind_arguments(forward_signature(model), inputs[0], inputs[1])[0])
    with tracer, _Watch(tracer):
        yield tracer


def make_trace(
    model: torch.nn.Module,
    containers: list[BlockContainer],
    calls: list[BlockCall],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any = None,
) -> Trace:
    values, forms, latent, timestep = describe_inputs(model, args, kwargs)
    return Trace(
        transformer=type(model).__name__,
        containers=containers,
        calls=calls,
        inputs={k: _shape(t) for k, v in values.items() for t in list(tensors_in(v))[:1]},
        input_forms=forms,
        latent_name=latent,
        timestep_name=timestep,
        patch_sizes=_patch_sizes(model),
        output_shapes=[tuple(t.shape) for t in tensors_in(output)],
    )


def no_blocks_message(model: torch.nn.Module) -> str:
    return (
        f"{type(model).__name__} holds no list of repeated blocks (no nn.ModuleList / nn.Sequential of modules "
        "of one class), so there is no block stack to cache; magsdk caches transformers whose blocks live in "
        "such a list. Is this the transformer (and not, e.g., a pipeline component around it)?"
    )


def trace_forward(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], keep: Keep = "all"
) -> tuple[Trace, Any]:
    """Run ``model(*args, **kwargs)`` once under ``torch.no_grad`` and record every block call.

    Raises ``UsageError`` when the model holds no list of repeated blocks; exceptions of the
    forward itself propagate unchanged (callers decide how to report them).
    """
    containers = find_block_containers(model)
    if not containers:
        raise UsageError(no_blocks_message(model))
    with torch.no_grad(), tracing(model, containers, keep, (args, kwargs)) as tracer:
        output = model(*args, **kwargs)
    return make_trace(model, containers, tracer.calls, args, kwargs, output), output
