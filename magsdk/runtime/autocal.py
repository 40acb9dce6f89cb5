"""Zero-config start: measure a model's curve on its first generation, cache with it from the second.

``magsdk.enable(pipe, auto_calibrate=True)`` on a model with no strategy and no curve. A curve
belongs to one transformer (class + config), one schedule (scheduler class + shift settings), one
resolution (image tokens) and one step count — ``magsdk.calibration.curve_store.CurveKey``. At the
start of each generation nothing is known yet, so the session records like a calibration; after
the first call (which computes in any case: nothing is cached yet) the key is complete. If a curve
for it exists — measured earlier in this process, or by an earlier process and kept in the user
cache folder — the rest of the generation is cached with it; otherwise the whole generation is
measured and its curve saved for the next one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from magsdk.calibration import curve_store
from magsdk.config import CalibrationResult, MagCacheConfig
from magsdk.curves import CurveSource
from magsdk.errors import UsageError
from magsdk.runtime.scheduler_link import SchedulerLink

logger = logging.getLogger("magsdk")


class AutoCalibration:
    """Finds or measures the curve of each (steps, resolution) a transformer is run at."""

    def __init__(self, transformer: torch.nn.Module, link: SchedulerLink | None, config: MagCacheConfig) -> None:
        self.transformer = transformer
        self.link = link
        self.config = config
        self.known: dict[str, CalibrationResult] = {}  # by key id (keys hold dicts: not hashable)
        #: Keys whose save was announced: a generation's file is rewritten as each branch ends, said once.
        self.announced: set[str] = set()

    @property
    def scheduler(self) -> Any:
        """The scheduler of the generation in flight (a curve belongs to its schedule)."""
        return self.link.scheduler if self.link is not None else None

    def key(self, num_steps: int | None, image_tokens: int | None) -> curve_store.CurveKey:
        if num_steps is None:
            raise UsageError(
                f"auto_calibrate needs the run's step count to key its curve: enable it on a pipeline (its scheduler "
                f"says), or pass scheduler= or MagCacheConfig(num_inference_steps=...) for a bare "
                f"{type(self.transformer).__name__}"
            )
        return curve_store.CurveKey.for_objects(
            self.transformer, self.scheduler, image_tokens=max(1, image_tokens or 1), num_steps=num_steps
        )

    def find(self, key: curve_store.CurveKey) -> CurveSource | None:
        result = self.known.get(key.id())
        if result is None:
            result = curve_store.find(key)
            if result is not None:
                logger.info("magsdk: using the cached curve %s", curve_store.path_for(key))
                self.known[key.id()] = result
        if result is None:
            return None
        config = self.config.model_copy(update={"mag_ratios": result.curves(), "timesteps": result.argument_timesteps(),
                                                "schedule": result.schedule, "probes": result.probe_curves(),
                                                "auto_calibrate": False})
        source = CurveSource.from_config(config)
        assert source is not None
        return source

    def save(self, key: curve_store.CurveKey, result: CalibrationResult) -> None:
        self.known[key.id()] = result
        cls = type(self.transformer)
        path = curve_store.save(
            key, result, source="magsdk.enable(auto_calibrate=True)", transformer_module=cls.__module__,
            transformer_config=dict(getattr(self.transformer, "config", {}) or {}),
        )
        if key.id() in self.announced:
            logger.debug("magsdk: %s rewritten with the branches measured so far", path)
            return
        self.announced.add(key.id())
        logger.info(
            "magsdk: measured the curve of %s at %d steps, %d image tokens; saved to %s (turn it into a strategy with "
            "`magsdk scaffold --from-cache %s`)", cls.__name__, key.num_steps, key.image_tokens, path, key.id(),
        )
