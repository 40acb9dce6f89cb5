"""Run a model inside ``magsdk.calibrate`` and turn the averaged curves into a ``CalibrationEntry``."""

from magsdk.calibration.drivers import (
    DEFAULT_PROMPTS,
    DEFAULT_SIZE,
    CalibrationRunError,
    LoadedModel,
    is_pipeline_target,
    load_driver,
    load_model,
    pipeline_call_kwargs,
    read_prompts,
    run_calibration,
    to_entry,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_SIZE",
    "CalibrationRunError",
    "LoadedModel",
    "is_pipeline_target",
    "load_driver",
    "load_model",
    "pipeline_call_kwargs",
    "read_prompts",
    "run_calibration",
    "to_entry",
]
