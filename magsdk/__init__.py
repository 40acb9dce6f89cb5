"""magsdk: MagCache for any diffusion transformer.

``magsdk.enable(pipe)`` attaches the cache using the strategy registered for the pipeline's
transformer; ``magsdk.calibrate(pipe)`` measures a ratio curve; ``magsdk.plan`` shows the skip
schedule before anything runs.
"""

from magsdk.config import (
    BlockGroupReport,
    BlockMetadata,
    BranchCalibration,
    CalibrationEntry,
    CalibrationResult,
    InspectionReport,
    MagCacheConfig,
)
from magsdk.errors import BlockLayoutError, MagSDKError, StrategyNotFoundError, UsageError
from magsdk.ratios import SkipPlan, plan, resample_by_timesteps, resample_nearest
from magsdk.registry import StrategyRegistry, TransformerBlockRegistry, discover_strategies
from magsdk.runtime import CacheStats, CalibrationHandle, MagCacheHandle, calibrate, enable
from magsdk.strategy import MagCacheStrategy, load_calibrations

__version__ = "0.1.0"

__all__ = [
    "BlockGroupReport",
    "BlockLayoutError",
    "BlockMetadata",
    "BranchCalibration",
    "CacheStats",
    "CalibrationEntry",
    "CalibrationHandle",
    "CalibrationResult",
    "InspectionReport",
    "MagCacheConfig",
    "MagCacheHandle",
    "MagCacheStrategy",
    "MagSDKError",
    "SkipPlan",
    "StrategyNotFoundError",
    "StrategyRegistry",
    "TransformerBlockRegistry",
    "UsageError",
    "calibrate",
    "discover_strategies",
    "enable",
    "load_calibrations",
    "plan",
    "resample_by_timesteps",
    "resample_nearest",
]
