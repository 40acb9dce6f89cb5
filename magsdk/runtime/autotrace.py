"""Enable MagCache on a transformer nobody described: infer its block conventions from its first call.

``magsdk.enable(model, config)`` with neither a strategy nor metadata, for a transformer class
with no registered strategy, lands here. The transformer's ``forward`` is wrapped so that its
first real call (the user's own inputs: no synthesis, no second forward) runs with every block
recorded (``magsdk.inspect.trace``, keeping only the tensors the cache needs), the conventions
are inferred (``magsdk.inspect.infer``), logged and remembered per class, and then the normal
``CacheSession`` is attached. That first call computes (it cannot skip: nothing is cached yet),
and it is replayed into the session's bookkeeping so that it counts in the statistics, the
step tracking, the residual and a calibration like any other computed call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from magsdk.config import InspectionReport
from magsdk.errors import BlockLayoutError
from magsdk.inspect.infer import ambiguity_error, infer_metadata, summary
from magsdk.inspect.trace import BlockCall, Trace, find_block_containers, make_trace, tracing
from magsdk.patching import Patches
from magsdk.registry import InferredReportRegistry
from magsdk.runtime.layout import MetadataMismatchError
from magsdk.runtime.session import CacheSession, eager, wrap_cache_context

logger = logging.getLogger("magsdk")

SessionFactory = Callable[[InspectionReport], CacheSession]


def known_report(transformer: torch.nn.Module) -> InspectionReport | None:
    """The conventions already inferred for this transformer's class in this process, if any."""
    return InferredReportRegistry.get(type(transformer))


def forget(cls: type | None = None) -> None:
    """Drop remembered reports (one class, or all): the next enable traces again."""
    InferredReportRegistry.forget(cls)


def trace_first_call(
    transformer: torch.nn.Module,
    make_session: SessionFactory,
    sessions: list[CacheSession],
    pending: list[FirstCall],
) -> None:
    """Wrap ``transformer.forward`` so that its first call infers the metadata and attaches a session.

    ``sessions`` is the handle's list: the new session is appended to it. The waiting wrapper is
    appended to ``pending`` so that ``disable()`` removes it even if no call ever came.
    """
    if not find_block_containers(transformer):
        raise BlockLayoutError(
            f"{type(transformer).__name__} has no strategy and holds no list of repeated blocks (nn.ModuleList / "
            "nn.Sequential of one block class) to trace; pass metadata= or a strategy= to magsdk.enable()"
        )
    pending.append(FirstCall(transformer, make_session, sessions))


class FirstCall:
    """The transformer's ``forward`` until its first call: trace it, infer, attach the real session."""

    def __init__(
        self, transformer: torch.nn.Module, make_session: SessionFactory, sessions: list[CacheSession]
    ) -> None:
        self.transformer = transformer
        self.make_session = make_session
        self.sessions = sessions
        self.context_name: str | None = None
        self.patches = Patches("magsdk first-call tracing")
        self.patches.patch(transformer, "forward", self._wrap_forward(transformer.forward))
        context = getattr(transformer, "cache_context", None)
        if callable(context):
            self.patches.patch(transformer, "cache_context", wrap_cache_context(context, self))

    def cancel(self) -> None:
        """Remove the waiting wrapper (``disable()`` before any call)."""
        self.patches.restore()

    def _wrap_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        first = self

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not first.patches:  # cancelled, but somebody wrapped us: pass through
                return original(*args, **kwargs)
            return first.run(original, args, kwargs)

        return forward

    @eager
    def run(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        transformer = self.transformer
        containers = find_block_containers(transformer)
        with tracing(transformer, containers, keep="edges", inputs=(args, kwargs)) as tracer:
            output = original(*args, **kwargs)
        trace = make_trace(transformer, containers, tracer.calls, args, kwargs, output)
        report = infer_metadata(trace).model_copy(update={"inputs": "user"})
        if report.ambiguous:  # never cache with guessed conventions (docs/inspect.md, "Ambiguous traces")
            raise BlockLayoutError(ambiguity_error(report))
        name = type(transformer).__name__
        InferredReportRegistry.register(type(transformer), report)
        logger.info("magsdk: %s has no strategy; conventions inferred from its first call: %s (head %s, tail %s)",
                    name, summary(report), report.head, report.tail)
        for warning in report.warnings:
            logger.warning("magsdk: %s: %s", name, warning)
        self.patches.restore()
        session = self.make_session(report)
        self.sessions.append(session)
        try:
            _replay(session, trace, args, kwargs, self.context_name)
        except MetadataMismatchError as error:  # as for any call: the model runs plainly from now on
            session.stop(error)
            raise
        return output


def _calls_of(trace: Trace, path: str) -> list[BlockCall]:
    return [c for c in trace.calls if c.path == path]


def _replay(
    session: CacheSession, trace: Trace, args: tuple[Any, ...], kwargs: dict[str, Any], context: str | None
) -> None:
    """Book the traced (computed) call into the session as if its own layout had run it."""
    head, tail = session.stack.paths[0], session.stack.paths[-1]
    head_calls, tail_calls = _calls_of(trace, head), _calls_of(trace, tail)
    if not head_calls or not tail_calls or head_calls[0].values is None:
        raise MetadataMismatchError(
            f"{session.name}: the traced call did not run {head} and {tail} as first and last blocks"
        )
    previous_context, session.context_name = session.context_name, context
    try:
        call = session.before_call(args, kwargs)
    finally:
        session.context_name = previous_context
    gate = session.stack.gate
    if call.skip:  # cannot happen (nothing is cached yet); book it as computed all the same
        call.skip = False
    gate.head_input = session.stack.head_io.read_hidden((), head_calls[0].values)
    gate.head_output = head_calls[0].output
    gate.tail_output = tail_calls[-1].output
    session.after_call(call)
