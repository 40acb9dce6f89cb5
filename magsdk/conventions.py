"""Argument-name conventions of diffusers transformers, in one place for the runtime and ``inspect``."""

from __future__ import annotations

#: Transformer ``forward`` parameters that hold the timestep / noise level, most likely first.
TIMESTEP_ARGUMENT_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time_step", "noise_level", "time")
