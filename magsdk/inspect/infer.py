"""Infer each block group's conventions (``BlockMetadata``) from the data flow of one traced forward.

This is the one place where conventions are inferred; ``magsdk inspect`` and the runtime's
first-call tracing both call :func:`infer_metadata`. Nothing here reads a block's or a
transformer's *names* to decide a convention except as a last tie-break: the facts come from
which output of block *i* is handed to which argument of block *i+1* (the very tensor, or one
with equal values), from concatenations between groups, and from token counts.

The steps:

1. per group, the *flows*: argument name → output slot, voted over consecutive calls;
2. the image-token counts of the latents the transformer received (its first latent-like
   tensor, divided by its patch sizes) and the token counts of its other sequence inputs;
3. the *chain*: the groups, in execution order, through which the image stream runs — the
   first group whose flowing argument holds image tokens, then every group whose argument
   receives the previous group's image output (directly, or inside a concatenation, which
   makes the sequence fused text+image from there on). Groups off the chain are side groups
   (e.g. text refiners) and are not cached;
4. per chain group, the hidden and encoder argument/slot, output kind, fused layout;
5. notes (each with a code, see ``magsdk.config.NoteCode``) for whatever would make head/tail
   caching unsafe, and the output slots the trace does not decide (``ambiguities``): when two
   pairings of arguments and outputs explain the trace equally well, the report says so instead
   of picking one, and the runtime refuses to cache with it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from magsdk.config import (
    AmbiguousSlots,
    BlockGroupReport,
    BlockMetadata,
    FusedOrder,
    InspectionNote,
    InspectionReport,
    NoteCode,
    OutputKind,
)
from magsdk.conventions import metadata_text
from magsdk.errors import BlockLayoutError
from magsdk.inspect.trace import (
    BlockCall,
    Link,
    Near,
    SlotKey,
    Trace,
    describe,
    output_slots,
    same_values,
    tokens_of,
)

_HIDDEN_HINTS = ("hidden_states", "hidden", "x", "tokens", "img", "image_tokens", "latents", "gen_seq", "h")
_ENCODER_HINTS = ("encoder", "context", "text", "txt", "cond", "und", "prompt", "caption")
_KINDS: tuple[OutputKind, ...] = ("tensor", "tuple", "list", "dict", "dataclass")


class _Notes(list[InspectionNote]):
    """The notes of one inference, in the order found, each message once."""

    def add(self, code: NoteCode, message: str, group: str | None = None) -> None:
        if all(note.message != message for note in self):
            self.append(InspectionNote(code=code, message=message, group=group))


@dataclass
class _Tie:
    """Arguments and output slots of one call that shapes pair up but nothing else decides between."""

    arguments: list[str]
    slots: list[SlotKey]


@dataclass
class _Group:
    """One called block container and what its calls say about it."""

    path: str
    block_class: str
    count: int
    calls: list[BlockCall]
    kind: str = "none"
    flows: dict[str, SlotKey] = field(default_factory=dict)  # arg -> output slot (exact links)
    near_flows: dict[str, SlotKey] = field(default_factory=dict)  # arg -> slot, changed between blocks
    disagreements: list[str] = field(default_factory=list)
    #: Pairings the trace does not decide (single-call groups, fallback slots).
    ties: list[_Tie] = field(default_factory=list)
    _single_pairs: list[tuple[str, SlotKey]] | None = None

    @property
    def first(self) -> BlockCall:
        return self.calls[0]

    @property
    def last(self) -> BlockCall:
        return self.calls[-1]

    def pairs(self) -> list[tuple[str, SlotKey]]:
        """(argument, output slot) pairs that carry a state from block to block."""
        merged = dict(self.near_flows)
        merged.update(self.flows)
        if len(self.calls) > 1:
            return list(merged.items())
        if self._single_pairs is None:
            self._single_pairs, ties = _shape_pairs(self.first)
            self.ties.extend(ties)
        return list(self._single_pairs)


@dataclass
class _ChainGroup:
    group: _Group
    hidden_arg: str
    hidden_slot: SlotKey
    encoder_arg: str | None = None
    encoder_slot: SlotKey = None
    has_encoder_slot: bool = False
    fused: FusedOrder | None = None
    fuses_inputs: bool = False
    joined_by: str = "start"  # "start", "direct", "concat", "near"


@dataclass
class _Segment:
    groups: list[_ChainGroup]

    @property
    def blocks(self) -> int:
        return sum(g.group.count for g in self.groups)

    @property
    def image_tokens(self) -> int | None:
        head = self.groups[0]
        return tokens_of(head.group.first.shapes.get(head.hidden_arg) or ())


@dataclass
class _Facts:
    """What the transformer's own inputs say about the streams."""

    trace: Trace
    image_tokens: set[int]
    text_tokens: set[int]

    @property
    def latent(self) -> str | None:
        return self.trace.latent_name

    def from_latents(self, call: BlockCall, arg: str) -> bool:
        return self.latent is not None and self.latent in call.taint.get(arg, frozenset())

    def text_like(self, call: BlockCall, arg: str) -> bool:
        """Derives from a sequence input other than the latents (text, image prompts …), not from them."""
        taint = call.taint.get(arg, frozenset())
        if not taint or (self.latent is not None and self.latent in taint):
            return False
        shapes = self.trace.inputs
        return any(shapes.get(name) is not None and len(shapes[name] or ()) == 3 for name in taint)


# -- public entry ---------------------------------------------------------------------------------------
def infer_metadata(trace: Trace) -> InspectionReport:
    """The inspection report (groups, metadata, head, tail, warnings) of one traced forward.

    Raises ``BlockLayoutError`` when no group of blocks carries the image tokens from block to
    block (nothing a head/tail cache could skip).
    """
    warnings = _Notes()
    groups = _groups(trace, warnings)
    facts = _Facts(trace, image_token_counts(trace), _text_token_counts(trace))
    segments = _chains(groups, facts, warnings)
    if not segments:
        found = ", ".join(f"{g.path} ({g.count} × {g.block_class})" for g in groups) or "none called"
        raise BlockLayoutError(
            f"{trace.transformer}: found block lists ({found}) but none passes a hidden state from block to "
            "block with the shape it received (as transformer blocks do), so there is no block stack to cache. "
            "If the model's blocks live elsewhere, give them an nn.ModuleList."
        )
    segment = max(segments, key=lambda s: s.blocks)
    for other in segments:
        if other is not segment:
            warnings.add(
                "separate-stack",
                f"block groups {', '.join(g.group.path for g in other.groups)} form a separate stack "
                f"({other.blocks} blocks) that the hidden state reaches only through work outside any block; "
                f"only {', '.join(g.group.path for g in segment.groups)} ({segment.blocks} blocks) is cached"
            )
    in_segments = {g.group.path for s in segments for g in s.groups}
    in_chain = {g.group.path for g in segment.groups}
    gaps = [(a.order, b.order) for g in segment.groups for a, b in zip(g.group.calls, g.group.calls[1:], strict=False)]
    interleaved = [
        g for g in groups if g.path not in in_chain and any(lo < c.order < hi for c in g.calls for lo, hi in gaps)
    ]
    for group in interleaved:
        warnings.add(
            "interleaved-group",
            f"{group.path} ({group.count} × {group.block_class}) runs interleaved with the blocks of a cached group; "
            "on a skipped step it would still run between the pass-through blocks, so head/tail caching of this "
            "layout is unsafe without a strategy",
            group=group.path,
        )
    beside = [
        g for g in groups
        if g.path not in in_segments and g not in interleaved and g.kind in _KINDS and g.pairs()
    ]
    if beside:
        warnings.add(
            "side-groups",
            "not cached, they run on every step (e.g. text or conditioning refiners beside the image-token stack): "
            + ", ".join(f"{g.path} ({g.count} × {g.block_class})" for g in beside)
        )
    reports = [_group_report(chain, trace, warnings) for chain in segment.groups]
    _check_chain(segment, facts, warnings)
    _check_classes(reports, warnings)
    ambiguities = _ambiguities(segment, warnings)
    head_group, tail_group = segment.groups[0].group, segment.groups[-1].group
    return InspectionReport(
        transformer=trace.transformer,
        block_groups=reports,
        head=head_group.first.path,
        tail=tail_group.last.path,
        warnings=[note.message for note in warnings],
        notes=list(warnings),
        ambiguities=ambiguities,
        timestep_argument_name=trace.timestep_name,
    )


# -- step 1: groups and their flows -------------------------------------------------------------------
def _groups(trace: Trace, warnings: _Notes) -> list[_Group]:
    groups: list[_Group] = []
    for path in trace.groups_in_order():
        calls = trace.group_calls(path)
        container = trace.container(path)
        group = _Group(path=path, block_class=container.block_class, count=container.count, calls=calls)
        kinds = Counter(c.output_kind for c in calls)
        group.kind = kinds.most_common(1)[0][0]
        if len(kinds) > 1:
            shown = ", ".join(f"{k} ({n} calls)" for k, n in kinds.items())
            warnings.add(
                "mixed-output-kinds",
                f"{path}: blocks return different kinds of output ({shown}); the runtime expects one layout "
                "per block class",
                group=path,
            )
        _vote_flows(group)
        groups.append(group)
    return groups


def _vote_flows(group: _Group) -> None:
    votes: dict[str, Counter[SlotKey]] = {}
    near_votes: dict[str, Counter[SlotKey]] = {}
    pairs = 0
    for previous, call in zip(group.calls, group.calls[1:], strict=False):
        pairs += 1
        for name, link in call.links.items():
            if not link.is_concat and link.parts[0].call == previous.order:
                votes.setdefault(name, Counter())[link.parts[0].slot] += 1
        for name, near in call.near.items():
            if name not in call.links and near.source.call == previous.order:
                near_votes.setdefault(name, Counter())[near.source.slot] += 1
    if not pairs:
        return
    needed = max(1, math.ceil(pairs / 2))
    taken: set[SlotKey] = set()
    for name, counter in sorted(votes.items(), key=lambda item: -sum(item[1].values())):
        slot, count = counter.most_common(1)[0]
        if count >= needed and slot not in taken:
            group.flows[name] = slot
            taken.add(slot)
            if len(counter) > 1:
                group.disagreements.append(f"{name} came from output slots {dict(counter)}")
    for name, counter in near_votes.items():
        slot, count = counter.most_common(1)[0]
        exact = sum(votes.get(name, Counter()).values())
        if name not in group.flows and count + exact >= needed and slot not in taken:
            group.near_flows[name] = slot
            taken.add(slot)


def _shape_pairs(call: BlockCall) -> tuple[list[tuple[str, SlotKey]], list[_Tie]]:
    """For a group called once: arguments paired with output slots, and the pairings nothing decides.

    With no next block to hand a state to, the evidence is the call itself. An output that *is*
    an argument (the very tensor, or equal values) is that argument passed through: a block that
    returns ``(hidden * 2, encoder_hidden_states)`` returns the encoder state at [1], whatever
    the values. The other arguments pair with the output of their shape. When several arguments
    or several outputs share a shape, the nearest in value is taken as a guess and the tie is
    returned, so that the report can call the pairing ambiguous if it matters.
    """
    values = call.values or {}
    _, outputs = output_slots(call.output)
    slots = {s: o for s, o in call.output_shapes.items() if o is not None}
    args = [n for n in _arg_order(call) if (call.shapes.get(n) is not None and len(call.shapes[n] or ()) >= 2)]
    paired: dict[str, SlotKey] = {}
    for slot in slots:
        out = outputs.get(slot)
        if not isinstance(out, torch.Tensor):
            continue
        same = [n for n in args if n not in paired and values.get(n) is out]
        if not same:
            same = [n for n in args if n not in paired and isinstance(values.get(n), torch.Tensor)
                    and same_values(values[n], out)]
        if len(same) == 1:
            paired[same[0]] = slot
    ties: list[_Tie] = []
    used = set(paired.values())
    for name in args:
        if name in paired:
            continue
        shape = call.shapes.get(name)
        matches = [s for s, o in slots.items() if o == shape and s not in used]
        rivals = [n for n in args if n not in paired and call.shapes.get(n) == shape]
        if len(matches) > 1 or (matches and len(rivals) > 1):
            ties.append(_Tie(arguments=rivals, slots=matches))
        if len(matches) > 1:
            matches = _closest_slots(call, name, matches)
        if matches:
            paired[name] = matches[0]
            used.add(matches[0])
    return [(n, paired[n]) for n in args if n in paired], _merge_ties(ties)


def _merge_ties(ties: list[_Tie]) -> list[_Tie]:
    merged: list[_Tie] = []
    for tie in ties:
        twin = next((t for t in merged if set(t.arguments) & set(tie.arguments)), None)
        if twin is None:
            merged.append(_Tie(list(tie.arguments), list(tie.slots)))
        else:
            twin.arguments.extend(a for a in tie.arguments if a not in twin.arguments)
            twin.slots.extend(x for x in tie.slots if x not in twin.slots)
    return merged


def _closest_slots(call: BlockCall, name: str, slots: list[SlotKey]) -> list[SlotKey]:
    """Several outputs share the argument's shape: the nearest in value first (residual blocks)."""
    value = (call.values or {}).get(name)
    _, outputs = output_slots(call.output)
    if not isinstance(value, torch.Tensor) or not outputs:
        return slots

    def distance(slot: SlotKey) -> float:
        out = outputs.get(slot)
        if not isinstance(out, torch.Tensor):
            return math.inf
        return float(torch.linalg.vector_norm(out.float() - value.float()))

    return sorted(slots, key=distance)


def _arg_order(call: BlockCall) -> list[str]:
    order = [p for p in call.params if p in call.forms]
    order.extend(n for n in call.forms if n not in order)
    return order


# -- step 2: token counts --------------------------------------------------------------------------------
def image_token_counts(trace: Trace) -> set[int]:
    """Token counts the latents can have inside the blocks (packed, or patchified by the patch sizes)."""
    if trace.latent_name is None:
        return set()
    shape = trace.inputs.get(trace.latent_name)
    if shape is None:
        return set()
    if len(shape) == 3:
        return {shape[1]}
    patches = sorted(set(trace.patch_sizes) | {1}) if trace.patch_sizes else [1, 2, 4, 8]
    counts: set[int] = set()
    if len(shape) == 4:
        height, width = shape[2], shape[3]
        for p in patches:
            if height % p == 0 and width % p == 0:
                counts.add((height // p) * (width // p))
    elif len(shape) == 5:
        height, width = shape[3], shape[4]
        for frames in (shape[2], shape[1]):  # [B, C, F, H, W] or [B, F, C, H, W]
            for pt in patches:
                for p in patches:
                    if height % p == 0 and width % p == 0:
                        counts.add(math.ceil(frames / pt) * (height // p) * (width // p))
    return counts


def _text_token_counts(trace: Trace) -> set[int]:
    counts = set()
    for name, shape in trace.inputs.items():
        if name != trace.latent_name and shape is not None and len(shape) == 3:
            counts.add(shape[1])
    return counts


# -- step 3: the chain of groups the image tokens run through ------------------------------------------
#: A group joins a stack through a changed (not equal) hidden state only when it is this close to it.
NEAR_LIMIT = 0.5


def _chains(groups: list[_Group], facts: _Facts, warnings: _Notes) -> list[_Segment]:
    for strict in (True, False):
        segments = _build_segments(groups, facts, warnings, strict)
        if segments:
            if not strict:
                warnings.add("no-latent-lineage", _no_lineage_text(facts))
            return segments
    return []


def _no_lineage_text(facts: _Facts) -> str:
    """Why the hidden state was chosen without the latents to go by, in words (no None or [] placeholders)."""
    trace = facts.trace
    if facts.latent is None:
        tensors = ", ".join(
            f"{name} {_shape_text(shape)}" for name, shape in trace.inputs.items() if shape is not None
        )
        found = (
            "the transformer's forward received no tensor of 3 or more dimensions (a token sequence or an image) "
            "to take for the latents"
            + (f" (its tensor arguments: {tensors})" if tensors else " (it received no tensor argument)")
        )
    else:
        shape = trace.inputs.get(facts.latent)
        counts = sorted(facts.image_tokens)
        tokens = f" or has their {' or '.join(str(c) for c in counts)} tokens" if counts else ""
        found = (
            f"no block argument derives from the latents (the forward's argument {facts.latent!r}"
            + (f" {_shape_text(shape)}" if shape is not None else "")
            + ")" + tokens
        )
    return (
        f"{found}; the blocks' hidden state was chosen by how values flow from block to block and by argument "
        "order alone. If the hidden_states_argument_name inferred is not the argument that carries the image, "
        "pass metadata= with the right one"
    )


def _shape_text(shape: tuple[int, ...]) -> str:
    return "of shape (" + ", ".join(str(d) for d in shape) + ")"


def _build_segments(groups: list[_Group], facts: _Facts, warnings: _Notes, strict: bool) -> list[_Segment]:
    segments: list[_Segment] = []
    for group in groups:
        if group.kind not in _KINDS:
            continue
        near: _ChainGroup | None = None
        for segment in reversed(segments):
            joined = _join(segment, group, facts, warnings)
            if joined is not None and joined.joined_by != "near":
                segment.groups.append(joined)
                break
            near = near or joined
        else:
            # Not fed by a stack: it starts one if it carries the image tokens (in the relaxed pass, any
            # group that passes a state along may); otherwise it is a side group.
            if near is not None:
                segments.append(_Segment([near]))
            else:
                start = _start(group, facts, strict)
                if start is not None:
                    segments.append(_Segment([start]))
    return segments


def _score(call: BlockCall, name: str, position: int, facts: _Facts) -> float:
    shape = call.shapes.get(name)
    tokens = tokens_of(shape) if shape else None
    score = 0.0
    if facts.from_latents(call, name):
        score += 5
    elif facts.text_like(call, name):
        score -= 3
    if tokens is not None and tokens in facts.image_tokens:
        score += 2
    elif tokens is not None and tokens in facts.text_tokens:
        score -= 1
    lowered = name.lower()
    if lowered in _HIDDEN_HINTS:
        score += 0.5
    if any(hint in lowered for hint in _ENCODER_HINTS):
        score -= 0.5
    return score - 0.01 * position


def _start(group: _Group, facts: _Facts, strict: bool) -> _ChainGroup | None:
    first = group.first
    pairs = [(a, s) for a, s in group.pairs() if _is_sequence(first.shapes.get(a))]
    if not pairs:
        return None
    order = _arg_order(first)
    scored = sorted(pairs, key=lambda p: -_score(first, p[0], order.index(p[0]), facts))
    hidden_arg, hidden_slot = scored[0]
    # With lineage known (the usual case), a stack starts where the latents enter a block; token counts
    # decide only when no argument of the call has any lineage.
    lineage_known = bool(first.taint)
    if strict and not (
        facts.from_latents(first, hidden_arg)
        or (not lineage_known and tokens_of(first.shapes.get(hidden_arg) or ()) in facts.image_tokens)
    ):
        return None
    chain = _ChainGroup(group, hidden_arg, hidden_slot)
    _pick_encoder(chain, scored[1:], facts, None)
    _detect_internal_fusion(chain)
    return chain


def _image_region_equal(near: Near, segment: _Segment, fused: FusedOrder | None) -> bool:
    """The changed values lie outside the image tokens of a fused sequence (e.g. a text part replaced)."""
    n = segment.image_tokens
    if n is None or fused is None:
        return False
    return near.equal_suffix >= n if fused == "text_image" else near.equal_prefix >= n


def _join(segment: _Segment, group: _Group, facts: _Facts, warnings: _Notes) -> _ChainGroup | None:
    """``group`` continues the stack if one of its first call's arguments receives the image stream."""
    previous = segment.groups[-1]
    producer = previous.group.last.order
    first = group.first
    for name in _arg_order(first):
        link = first.links.get(name)
        if link is None:
            continue
        positions = [
            i for i, part in enumerate(link.parts) if part.call == producer and part.slot == previous.hidden_slot
        ]
        if not positions:
            continue
        chain = _ChainGroup(group, name, _hidden_slot(group, name), joined_by="concat" if link.is_concat else "direct")
        if link.is_concat:
            chain.fused = _fused_order(positions[0], len(link.parts), group, warnings)
        else:
            chain.fused = previous.fused
        _continue_encoder(chain, previous, link, facts)
        if not link.exact:
            warnings.add(
                "in-place-change",
                f"{previous.group.last.path} → {first.path}: the hidden state is changed in place between the "
                "two groups, outside any block; on a skipped step the cached residual already holds that change "
                "and it is applied again",
                group=group.path,
            )
        return chain
    for name, near in first.near.items():
        if near.source.call != producer or near.source.slot != previous.hidden_slot:
            continue
        chain = _ChainGroup(group, name, _hidden_slot(group, name), fused=previous.fused, joined_by="near")
        if _image_region_equal(near, segment, previous.fused):
            chain.joined_by = "direct"  # only the non-image part of a fused sequence changed
        elif near.rel_diff > NEAR_LIMIT:
            continue  # same shape, unrelated values
        else:
            warnings.add(
                "between-block-work",
                f"{previous.group.last.path} → {first.path}: {name!r} has the shape of the previous group's "
                f"hidden output but other values (max |Δ| = {near.max_abs_diff:.3g}, relative "
                f"{near.rel_diff:.3g}): work between the groups happens outside any block; on a skipped step the "
                "cached residual already holds it and it runs again on top, so the stack is split there",
                group=group.path,
            )
        _continue_encoder(chain, previous, None, facts)
        return chain
    return None


def _hidden_slot(group: _Group, arg: str) -> SlotKey:
    pairs = dict(group.pairs())
    return pairs[arg] if arg in pairs else _fallback_slot(group, arg)


def _fallback_slot(group: _Group, arg: str) -> SlotKey:
    """No flow for the hidden argument (last group called once, fused output …): match by tokens."""
    call = group.first
    shape = call.shapes.get(arg)
    slots = [s for s, o in call.output_shapes.items() if o is not None]
    if shape is not None:
        same = [s for s in slots if call.output_shapes[s] == shape]
        if len(same) > 1:  # an output that is another argument passed through is not this one's
            same = [s for s in same if not _passes_through_other(call, arg, s)] or same
        if len(same) > 1:
            group.ties.append(_Tie(arguments=[arg], slots=same))
        if same:
            return _closest_slots(call, arg, same)[0]
        longer = [s for s in slots if _same_but_tokens(call.output_shapes[s], shape)]
        if longer:
            return longer[0]
    return slots[0] if slots else None


def _passes_through_other(call: BlockCall, arg: str, slot: SlotKey) -> bool:
    out = output_slots(call.output)[1].get(slot)
    if not isinstance(out, torch.Tensor) or call.values is None:
        return False
    return any(
        name != arg and isinstance(value, torch.Tensor) and (value is out or same_values(value, out))
        for name, value in call.values.items()
    )


def _same_but_tokens(a: tuple[int, ...] | None, b: tuple[int, ...]) -> bool:
    return a is not None and len(a) == len(b) >= 3 and a[0] == b[0] and a[2:] == b[2:]


def _fused_order(position: int, parts: int, group: _Group, warnings: _Notes) -> FusedOrder | None:
    if position == parts - 1:
        return "text_image"
    if position == 0:
        return "image_text"
    warnings.add(
        "fused-image-in-middle",
        f"{group.first.path} receives a concatenation of {parts} sequences with the image tokens in position "
        f"{position}; the runtime can only take the residual of image tokens at the start or the end",
        group=group.path,
    )
    return None


def _continue_encoder(chain: _ChainGroup, previous: _ChainGroup, link: Link | None, facts: _Facts) -> None:
    group = chain.group
    others = [(a, s) for a, s in group.pairs() if a != chain.hidden_arg and s != chain.hidden_slot]
    # the argument that receives the previous group's encoder output, if any
    if previous.has_encoder_slot and link is not None and not link.is_concat:
        producer = previous.group.last.order
        for name, other in group.first.links.items():
            if name == chain.hidden_arg or other.is_concat:
                continue
            if other.parts[0].call == producer and other.parts[0].slot == previous.encoder_slot:
                slot = dict(others).get(name)
                chain.encoder_arg = name
                if slot is not None:
                    chain.encoder_slot, chain.has_encoder_slot = slot, True
                break
    if chain.encoder_arg is None:
        _pick_encoder(chain, others, facts, previous.encoder_arg)
    if chain.fused is not None and chain.encoder_arg is not None and not chain.has_encoder_slot:
        chain.fuses_inputs = True
    _detect_internal_fusion(chain)


def _pick_encoder(
    chain: _ChainGroup, candidates: list[tuple[str, SlotKey]], facts: _Facts, sibling: str | None
) -> None:
    first = chain.group.first
    usable = [(a, s) for a, s in candidates if a != chain.hidden_arg and s != chain.hidden_slot]
    usable = [(a, s) for a, s in usable if _is_sequence(first.shapes.get(a))]
    if usable:
        order = _arg_order(first)
        usable.sort(key=lambda p: (not facts.text_like(first, p[0]),
                                   tokens_of(first.shapes.get(p[0]) or ()) not in facts.text_tokens,
                                   order.index(p[0])))
        chain.encoder_arg, chain.encoder_slot = usable[0]
        chain.has_encoder_slot = True
        return
    # No state flows back out: the encoder states are a constant input (cross-attention) or absent.
    if sibling is not None and sibling in first.forms:
        chain.encoder_arg = sibling
        return
    chain.encoder_arg = _constant_sequence_argument(chain, facts)


def _constant_sequence_argument(chain: _ChainGroup, facts: _Facts) -> str | None:
    """A text-like sequence handed unchanged to every block (cross-attention context), if any."""
    group = chain.group
    first = group.first
    hidden_shape = first.shapes.get(chain.hidden_arg)
    candidates = []
    for name in _arg_order(first):
        shape = first.shapes.get(name)
        if name == chain.hidden_arg or shape is None or len(shape) != 3 or name in first.links:
            continue
        if hidden_shape is not None and shape[0] != hidden_shape[0]:
            continue
        if any(call.shapes.get(name) != shape for call in group.calls):
            continue
        if first.taint:
            if facts.text_like(first, name):
                candidates.append(name)
        elif shape[1] in facts.text_tokens or any(h in name.lower() for h in _ENCODER_HINTS):
            candidates.append(name)
    return candidates[0] if candidates else None


def _detect_internal_fusion(chain: _ChainGroup) -> None:
    """A block that concatenates its encoder and hidden arguments itself and returns one sequence."""
    if chain.encoder_arg is None or chain.has_encoder_slot:
        return
    for cat in chain.group.first.cats:
        if chain.encoder_arg in cat and chain.hidden_arg in cat:
            first = chain.group.first
            out = first.output_shapes.get(chain.hidden_slot)
            hidden = first.shapes.get(chain.hidden_arg)
            if out is not None and hidden is not None and tokens_of(out) != tokens_of(hidden):
                chain.fuses_inputs = True
                if chain.fused is None:
                    enc_first = cat.index(chain.encoder_arg) < cat.index(chain.hidden_arg)
                    chain.fused = "text_image" if enc_first else "image_text"
            return


def _is_sequence(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) >= 2


# -- step 4: metadata --------------------------------------------------------------------------------------
def _group_report(chain: _ChainGroup, trace: Trace, warnings: _Notes) -> BlockGroupReport:
    group = chain.group
    kind = group.kind
    assert kind in _KINDS
    output_kind: OutputKind = _KINDS[_KINDS.index(kind)]
    slots = list(group.last.output_shapes) or list(output_slots(group.last.output)[1])
    hidden_index, hidden_key = _index_and_key(chain.hidden_slot, slots)
    encoder_index: int | None = None
    encoder_key: str | None = None
    if chain.has_encoder_slot:
        encoder_index, encoder_key = _index_and_key(chain.encoder_slot, slots)
    if output_kind == "tensor":
        hidden_index, encoder_index, encoder_key = 0, None, None
    metadata = BlockMetadata(
        hidden_states_argument_name=chain.hidden_arg,
        encoder_hidden_states_argument_name=chain.encoder_arg,
        return_hidden_states_index=hidden_index,
        return_encoder_hidden_states_index=encoder_index,
        output_kind=output_kind,
        return_hidden_states_key=hidden_key,
        return_encoder_hidden_states_key=encoder_key,
        fused_sequence_order=chain.fused,
        fuses_inputs=chain.fuses_inputs,
    )
    for note in group.disagreements:
        warnings.add(
            "inconsistent-flows", f"{group.path}: not every block passed its states the same way ({note})", group.path
        )
    return BlockGroupReport(path=group.path, block_class=group.block_class, count=group.count, metadata=metadata)


def _index_and_key(slot: SlotKey, slots: list[SlotKey]) -> tuple[int, str | None]:
    if isinstance(slot, int):
        return slot, None
    if isinstance(slot, str):
        return (slots.index(slot) if slot in slots else 0), slot
    return 0, None


# -- step 5: what makes head/tail caching unsafe -------------------------------------------------------------
def _check_chain(segment: _Segment, facts: _Facts, warnings: _Notes) -> None:
    head, tail = segment.groups[0], segment.groups[-1]
    head_shape = head.group.first.shapes.get(head.hidden_arg)
    tail_shape = tail.group.last.output_shapes.get(tail.hidden_slot)
    if head_shape is not None and tail_shape is not None and head_shape != tail_shape:
        fused_ok = (
            tail.fused is not None
            and len(tail_shape) == len(head_shape)
            and tail_shape[0] == head_shape[0]
            and tail_shape[2:] == head_shape[2:]
        )
        if not fused_ok:
            warnings.add(
                "residual-undefined",
                f"the first block receives {head.hidden_arg!r} of shape {head_shape} but the last block returns "
                f"{tail_shape}; the residual x_out - x_in is not defined, so the runtime cannot cache this stack "
                "without a strategy that overrides compute_residual",
                group=tail.group.path,
            )
    outputs = [shape for shape in facts.trace.output_shapes if len(shape) >= 3]
    if tail.has_encoder_slot and tail.encoder_slot in tail.group.last.used_outside and len(outputs) > 1:
        warnings.add(
            "stale-second-stream",
            f"the last block {tail.group.last.path} also returns {tail.encoder_arg!r} (output "
            f"{_slot_text(tail.encoder_slot)}), the transformer uses it after the blocks and returns "
            f"{len(outputs)} tensors {outputs} (a second modality?); on a skipped step it passes through unchanged "
            "(only the hidden stream gets the cached residual), so that output would be stale",
            group=tail.group.path,
        )
    for chain in segment.groups:
        group = chain.group
        calls = group.calls
        indices = [c.index for c in calls]
        if indices != list(range(group.count)):
            if len(indices) > group.count or len(set(indices)) < len(indices):
                warnings.add(
                    "repeated-block-calls",
                    f"{group.path}: blocks were called {len(calls)} times for {group.count} blocks (a block runs "
                    "more than once per forward); the runtime hooks each block once and would take the wrong head "
                    "or tail",
                    group=group.path,
                )
            else:
                missing = sorted(set(range(group.count)) - set(indices))
                warnings.add(
                    "block-order",
                    f"{group.path}: blocks ran in the order {indices} (not 0..{group.count - 1}"
                    + (f"; never called: {missing}" if missing else "")
                    + "); the runtime takes block 0 as the head and the last block as the tail",
                    group=group.path,
                )
        if chain.hidden_arg in group.near_flows:
            changes = [c.near[chain.hidden_arg] for c in calls[1:]
                       if chain.hidden_arg in c.near and chain.hidden_arg not in c.links]
            changes = [n for n in changes if not _image_region_equal(n, segment, chain.fused)]
            if changes:
                worst = max(changes, key=lambda n: n.max_abs_diff)
                warnings.add(
                    "between-block-work",
                    f"{group.path}: between blocks the hidden state is changed outside any block (the input of a "
                    f"block is output {_slot_text(group.near_flows[chain.hidden_arg])} of the previous block plus "
                    f"something else, max |Δ| = {worst.max_abs_diff:.3g}), e.g. ControlNet residuals or token "
                    "replacement; on a skipped step the cached residual already holds that work and it runs again "
                    "between the skipped blocks, so it is applied twice (with the values of the last computed step)",
                    group=group.path,
                )
        for call in calls[1:]:
            link = call.links.get(chain.hidden_arg)
            if link is not None and not link.exact:
                warnings.add(
                    "in-place-change",
                    f"{call.path}: {chain.hidden_arg!r} is the previous block's output changed in place between the "
                    "blocks (outside any block); on a skipped step the cached residual already holds that change "
                    "and it is applied again",
                    group=group.path,
                )
                break
        _check_forms(chain, warnings)
        _check_outputs(chain, warnings)


def _slot_text(slot: SlotKey) -> str:
    return "the bare tensor" if slot is None else f"[{slot!r}]"


def _check_forms(chain: _ChainGroup, warnings: _Notes) -> None:
    group = chain.group
    for name in (chain.hidden_arg, chain.encoder_arg):
        if name is None:
            continue
        forms = {c.forms.get(name) for c in group.calls} - {None, "default"}
        if "varargs" in forms or name.startswith("*"):
            warnings.add(
                "argument-through-varargs",
                f"{group.path}: {name!r} reaches {group.block_class}.forward through *args, so it has no name the "
                "runtime can find it by; give forward a named parameter for it",
                group=group.path,
            )
        elif {"positional", "keyword"} <= forms:
            warnings.add(
                "mixed-argument-forms",
                f"{group.path}: {name!r} is passed positionally in some calls and by keyword in others; magsdk reads "
                "both, but hooks that look arguments up in one form only will miss it",
                group=group.path,
            )
        elif forms == {"varkw"}:
            warnings.add(
                "argument-through-kwargs",
                f"{group.path}: {name!r} is not a parameter of {group.block_class}.forward (it arrives through "
                "**kwargs); the runtime finds it only while it is passed by keyword",
                group=group.path,
            )


def _check_outputs(chain: _ChainGroup, warnings: _Notes) -> None:
    group = chain.group
    last = group.last
    if last.output_kind == "tuple" and type(last.output) is not tuple and last.output is not None:
        warnings.add(
            "tuple-subclass",
            f"{group.path}: blocks return a {type(last.output).__name__} (a tuple subclass); on skipped steps the "
            "runtime returns a plain tuple in its place",
            group=group.path,
        )
    _, slots = output_slots(last.output) if last.output is not None else ("none", {})
    hidden = slots.get(chain.hidden_slot) if slots else None
    if last.output is not None and not isinstance(hidden, torch.Tensor):
        warnings.add(
            "hidden-not-tensor",
            f"{last.path} returns {describe(hidden)} where the hidden state should be "
            f"(output {_slot_text(chain.hidden_slot)}); the runtime needs a tensor there",
            group=group.path,
        )


def _check_classes(reports: list[BlockGroupReport], warnings: _Notes) -> None:
    """The runtime keys metadata by block class; one class must not need two conventions.

    The fused order may differ (only the tail's is used, and ``metadata_by_class`` keeps the last group's).
    """
    seen: dict[str, BlockGroupReport] = {}
    for report in reports:
        other = seen.get(report.block_class)
        if other is not None:
            mine = report.metadata.model_copy(update={"fused_sequence_order": None})
            theirs = other.metadata.model_copy(update={"fused_sequence_order": None})
            if mine != theirs:
                warnings.add(
                    "class-conventions-differ",
                    f"{report.block_class} is used by {other.path} and {report.path} with different conventions; "
                    "enable(..., metadata=report) keys them by group, but a strategy's block_metadata must then "
                    "use the group paths as keys, not the class name",
                    group=report.path,
                )
        seen.setdefault(report.block_class, report)


# -- ambiguity ------------------------------------------------------------------------------------------------
def _ambiguities(segment: _Segment, warnings: _Notes) -> list[AmbiguousSlots]:
    """The ties that decide a cached group's hidden or encoder slot: the metadata there is a guess."""
    found: list[AmbiguousSlots] = []
    for chain in segment.groups:
        group = chain.group
        chosen = dict(group.pairs())
        chosen[chain.hidden_arg] = chain.hidden_slot
        if chain.has_encoder_slot and chain.encoder_arg is not None:
            chosen[chain.encoder_arg] = chain.encoder_slot
        states = {chain.hidden_arg} | ({chain.encoder_arg} if chain.has_encoder_slot and chain.encoder_arg else set())
        for tie in group.ties:
            if not states & set(tie.arguments):
                continue
            ambiguity = AmbiguousSlots(
                group=group.path,
                block_class=group.block_class,
                arguments=list(tie.arguments),
                slots=list(tie.slots),
                chosen={a: chosen[a] for a in tie.arguments if a in chosen},
            )
            if ambiguity in found:
                continue
            found.append(ambiguity)
            shapes = sorted({str(group.first.shapes.get(a)) for a in tie.arguments})
            guess = ", ".join(f"{a} → {_slot_text(chosen[a])}" for a in tie.arguments if a in chosen)
            warnings.add(
                "ambiguous-output-slot",
                f"{group.path} ({group.block_class}, called once): the arguments {', '.join(map(repr, tie.arguments))} "
                f"and the outputs {', '.join(_slot_text(x) for x in tie.slots)} all have the shape {', '.join(shapes)} "
                "and no output is an argument passed through, so this forward does not say which output holds "
                f"which state (nearest in value: {guess or 'none'}, a guess the runtime will not use). "
                + _ambiguity_hint(group.block_class),
                group.path,
            )
    return found


def _ambiguity_hint(block_class: str) -> str:
    """What to do about an ambiguous inspection; shown by ``inspect`` and in the runtime's refusal."""
    return (
        "Inspect with inputs whose hidden and encoder states differ in token count (`magsdk inspect TARGET "
        "--inputs FILE.py:FUNC`, or `magsdk.inspect.inspect_module(model, args, kwargs)`) and pass that report "
        "with `magsdk.enable(model, config, metadata=report)`, or write the conventions yourself: "
        f"`metadata={{{block_class!r}: magsdk.BlockMetadata(...)}}`."
    )


def ambiguity_error(report: InspectionReport) -> str:
    """Why a cache will not be enabled with ``report``: the message of a refusal, with what to do next."""
    notes = [n.message for n in report.notes if n.code == "ambiguous-output-slot"]
    groups = ", ".join(f"{a.group} ({', '.join(a.arguments)})" for a in report.ambiguities)
    return (
        f"{report.transformer}: the traced call does not decide which block output holds which state in {groups}; "
        "magsdk will not cache with guessed conventions (a wrong guess returns wrong images without an error). "
        + (notes[0] if len(notes) == 1 else " ".join(notes))
    )


def summary(report: InspectionReport) -> str:
    """One line per group, for logs."""
    return "; ".join(
        f"{group.path}: {group.count} × {group.block_class}, {metadata_text(group.metadata)}"
        for group in report.block_groups
    )
