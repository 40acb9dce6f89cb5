"""MagCache strategy for ``FluxTransformer2DModel`` (FLUX.1-dev, FLUX.1-schnell).

The 28-step curve is the one published by the MagCache authors for FLUX.1-dev
(Zehong-Ma/MagCache, MagCache4FLUX/magcache_flux.py, line 459), with the leading 1.0 that the
original prepends at run time. Default settings are diffusers' (0.06 / 3 / 0.2); the MagCache
repository's faster setting is threshold=0.24, max_skip_steps=5, retention_ratio=0.1 (2.8x).
"""

from __future__ import annotations

from typing import Any

from magsdk import BlockMetadata, MagCacheStrategy, load_calibrations

# Calibrations: rewritten by `magsdk calibrate`; everything else in this file is yours to edit.
CALIBRATIONS: list[dict[str, Any]] = [
    {
        "num_steps": 28,
        "source": "Zehong-Ma/MagCache MagCache4FLUX/magcache_flux.py (line 459), FLUX.1-dev, padded with 1.0",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "shape": "1024x1024",
        "synthetic": False,
        "branches": {
            "default": [
                1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125,
                1.02344, 0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0,
                0.99609, 0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359, 0.89062,
            ],
        },
    },
]


class FluxStrategy(MagCacheStrategy):
    transformer_cls_name = "FluxTransformer2DModel"
    block_groups = ("transformer_blocks", "single_transformer_blocks")
    block_metadata = {
        "FluxTransformerBlock": BlockMetadata(
            hidden_states_argument_name="hidden_states",
            encoder_hidden_states_argument_name="encoder_hidden_states",
            return_hidden_states_index=1,
            return_encoder_hidden_states_index=0,
            output_kind="tuple",
        ),
        "FluxSingleTransformerBlock": BlockMetadata(
            hidden_states_argument_name="hidden_states",
            encoder_hidden_states_argument_name="encoder_hidden_states",
            return_hidden_states_index=1,
            return_encoder_hidden_states_index=0,
            output_kind="tuple",
        ),
    }
    threshold = 0.06
    max_skip_steps = 3
    retention_ratio = 0.2
    calibrations = load_calibrations(CALIBRATIONS)
