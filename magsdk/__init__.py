"""magsdk: MagCache for any diffusion transformer.

``magsdk.enable(pipe)`` attaches the cache using the strategy registered for the pipeline's
transformer; ``magsdk.calibrate(pipe)`` measures a ratio curve; ``magsdk.plan`` shows the skip
schedule before anything runs.
"""

from magsdk.config import (
    AmbiguousSlots,
    BlockGroupReport,
    BlockMetadata,
    BranchCalibration,
    CalibrationEntry,
    CalibrationResult,
    InspectionNote,
    InspectionReport,
    MagCacheConfig,
    ScheduleInfo,
    StrategyVariant,
)
from magsdk.errors import BlockLayoutError, MagSDKError, StrategyNotFoundError, UsageError
from magsdk.export import (
    CacheDitExport,
    DiffusersRegistration,
    register_with_diffusers,
    to_cache_dit,
    to_diffusers_config,
)
from magsdk.planner import BudgetPlan, InfeasibleBudgetError, plan_budget
from magsdk.ratios import SkipPlan, plan, resample_by_timesteps, resample_nearest
from magsdk.registry import StrategyRegistry, TransformerBlockRegistry, discover_strategies, serve_bundled_package
from magsdk.runtime import CacheStats, CalibrationHandle, MagCacheHandle, calibrate, enable
from magsdk.runtime.distributed import DistributedCalibrationError, PlanMismatchError
from magsdk.strategy import MagCacheStrategy, load_calibrations, load_variants
from magsdk.variants import VariantSelectionError, select_variant

__version__ = "0.1.0"

# A ./strategies/ folder in the working directory (scaffold's default output) must not hide the bundled
# strategies from `import strategies.flux` (magsdk/registry.py, serve_bundled_package).
serve_bundled_package()

__all__ = [
    "AmbiguousSlots",
    "BlockGroupReport",
    "BlockLayoutError",
    "BlockMetadata",
    "BranchCalibration",
    "BudgetPlan",
    "CacheDitExport",
    "CacheStats",
    "CalibrationEntry",
    "CalibrationHandle",
    "CalibrationResult",
    "DiffusersRegistration",
    "DistributedCalibrationError",
    "InfeasibleBudgetError",
    "InspectionNote",
    "InspectionReport",
    "MagCacheConfig",
    "MagCacheHandle",
    "MagCacheStrategy",
    "MagSDKError",
    "PlanMismatchError",
    "ScheduleInfo",
    "SkipPlan",
    "StrategyNotFoundError",
    "StrategyRegistry",
    "StrategyVariant",
    "TransformerBlockRegistry",
    "UsageError",
    "VariantSelectionError",
    "calibrate",
    "discover_strategies",
    "enable",
    "load_calibrations",
    "load_variants",
    "plan",
    "plan_budget",
    "register_with_diffusers",
    "resample_by_timesteps",
    "resample_nearest",
    "select_variant",
    "to_cache_dit",
    "to_diffusers_config",
]
