"""Argument-name conventions shared by the runtime, inspection and input synthesis, and one text form of metadata.

Three parts of magsdk look arguments up by name: the runtime's step tracker (which argument is
the timestep), inspection (which transformer input holds the latents, which the timestep) and
input synthesis (what to make for a parameter). They used to keep their own lists, which drifted
apart (one knew ``time``, the others did not); they all read these. Names are only a first
guess everywhere they are used: inspection decides from data flow, and the runtime counts calls
when a forward has no timestep argument at all.

This module imports nothing but the standard library and ``magsdk.config``, so the runtime can
use it without pulling in inspection.
"""

from __future__ import annotations

from magsdk.config import BlockMetadata

#: Transformer ``forward`` parameters that hold the timestep / noise level, most likely first. The
#: runtime reads the first of these a forward has; the order therefore matters.
TIMESTEP_ARGUMENT_NAMES: tuple[str, ...] = (
    "timestep", "timesteps", "t", "sigma", "sigmas", "time_step", "noise_level", "time",
)

#: Substrings that mark a parameter with another name as timestep-like (``vision_timesteps``,
#: ``sigma_t`` …); only used when no name of :data:`TIMESTEP_ARGUMENT_NAMES` is present.
TIMESTEP_NAME_HINTS: tuple[str, ...] = ("time", "sigma")

#: Transformer ``forward`` parameters that usually hold the noisy latents, most likely first.
LATENT_ARGUMENT_NAMES: tuple[str, ...] = (
    "hidden_states", "x", "latents", "latent", "sample", "img", "hidden", "z", "x_t", "noisy_latents",
    "latent_model_input", "hidden_state", "tokens",
)


def is_timestep_name(name: str) -> bool:
    """A known timestep name, or one that merely looks like one (see :data:`TIMESTEP_NAME_HINTS`)."""
    return name in TIMESTEP_ARGUMENT_NAMES or any(hint in name for hint in TIMESTEP_NAME_HINTS)


def _out(metadata: BlockMetadata, index: int | None, key: str | None) -> str:
    kind = metadata.output_kind
    if kind == "tensor":
        return "out"
    if kind == "dict":
        return f"out[{key!r}]"
    if kind == "dataclass":
        return f"out.{key}"
    return f"out[{index}]"


def metadata_text(metadata: BlockMetadata) -> str:
    """A block's conventions in one line, the same wherever magsdk shows them (inspect, logs, scaffold, zoo).

    ``hidden_states → out[1], encoder_hidden_states → out[0] (tuple)``;
    ``x → out (tensor), context not returned``; fused layouts end with ``; fused text_image`` (the field's value).
    """
    m = metadata
    text = f"{m.hidden_states_argument_name} → {_out(m, m.return_hidden_states_index, m.return_hidden_states_key)}"
    encoder = m.encoder_hidden_states_argument_name
    if encoder is not None:
        returned = (
            m.output_kind != "tensor"
            and (m.return_encoder_hidden_states_index is not None or m.return_encoder_hidden_states_key is not None)
        )
        if returned:
            text += f", {encoder} → {_out(m, m.return_encoder_hidden_states_index, m.return_encoder_hidden_states_key)}"
        else:
            text += f", {encoder} not returned"
    text += f" ({m.output_kind})"
    if m.fused_sequence_order is not None:
        text += f"; fused {m.fused_sequence_order}"
    if m.fuses_inputs:
        text += "; fuses its inputs"
    return text
