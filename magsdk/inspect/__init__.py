"""Inspect a transformer: resolve a target, build it small, make example inputs, trace blocks, infer metadata.

``inspect_target("FluxTransformer2DModel")`` and ``inspect_module(model, args, kwargs)`` return an
``InspectionReport`` that ``magsdk.enable(model, config, metadata=report)`` accepts directly.
The runtime's first-call tracing uses ``trace`` and ``infer`` only (never shrinking or synthesis).
"""

from magsdk.inspect.infer import ambiguity_error, infer_metadata, summary
from magsdk.inspect.inspector import (
    ForwardFailedError,
    NotADenoiserError,
    inputs_example,
    inspect_module,
    inspect_target,
    load_inputs_function,
)
from magsdk.inspect.targets import ResolvedTarget, resolve_target
from magsdk.inspect.trace import BlockContainer, Trace, find_block_containers, trace_forward

__all__ = [
    "BlockContainer",
    "ForwardFailedError",
    "NotADenoiserError",
    "ResolvedTarget",
    "Trace",
    "ambiguity_error",
    "find_block_containers",
    "infer_metadata",
    "inputs_example",
    "inspect_module",
    "inspect_target",
    "load_inputs_function",
    "resolve_target",
    "summary",
    "trace_forward",
]
