"""The part of magsdk users import at inference time (no jinja2, no libcst)."""

from magsdk.runtime.api import CalibrationHandle, MagCacheHandle, calibrate, enable, find_block_groups
from magsdk.runtime.stats import CacheStats, CallRecord

__all__ = [
    "CacheStats",
    "CalibrationHandle",
    "CallRecord",
    "MagCacheHandle",
    "calibrate",
    "enable",
    "find_block_groups",
]
