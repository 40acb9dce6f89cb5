"""What the installed diffusers offers, so that a test of something its release lacks skips and says why.

magsdk supports every diffusers from the floor in pyproject.toml up. Later releases added things some
tests compare with or build (diffusers' own MagCache in 0.37, Flux2 in 0.36, transformer classes in
most releases). On a release without them those tests skip with "diffusers X.Y.Z lacks ..." and never
fail; CI runs the suite on the newest diffusers and on the oldest supported one (.ci/run).
"""

from __future__ import annotations

import importlib
from typing import Any

import diffusers
import pytest

VERSION: str = diffusers.__version__


def lacks(feature: str) -> str:
    """The skip reason: the installed release and what it lacks."""
    return f"diffusers {VERSION} lacks {feature}"


def find(dotted: str) -> Any | None:
    """``"diffusers.hooks.MagCacheConfig"`` → that object, or None where this release has no such name."""
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def has(*dotted: str) -> bool:
    return all(find(name) is not None for name in dotted)


def needs(*dotted: str, feature: str | None = None) -> pytest.MarkDecorator:
    """A skip marker for a test that uses every name in ``dotted``."""
    missing = [name for name in dotted if find(name) is None]
    return pytest.mark.skipif(bool(missing), reason=lacks(feature or ", ".join(missing)))


def require(dotted: str, feature: str | None = None) -> Any:
    """The object; where it is missing, skip the test (or, called at import, the module) that asked."""
    found = find(dotted)
    if found is None:
        pytest.skip(lacks(feature or dotted), allow_module_level=True)
    return found


#: diffusers' own MagCache (``diffusers.hooks.mag_cache``) first shipped in diffusers 0.37.0.
MAG_CACHE = "MagCache (diffusers.hooks.apply_mag_cache / MagCacheConfig, added in 0.37.0)"
HAS_MAG_CACHE = has("diffusers.hooks.MagCacheConfig", "diffusers.hooks.apply_mag_cache")
needs_mag_cache = pytest.mark.skipif(not HAS_MAG_CACHE, reason=lacks(MAG_CACHE))
#: Flux2Transformer2DModel (FLUX.2) first shipped in diffusers 0.36.0.
FLUX2 = "Flux2Transformer2DModel (added in 0.36.0)"
HAS_FLUX2 = has("diffusers.Flux2Transformer2DModel")
needs_flux2 = pytest.mark.skipif(not HAS_FLUX2, reason=lacks(FLUX2))
#: diffusers' context parallelism (``ContextParallelConfig``, ``enable_parallelism``) first shipped in 0.36.0.
CONTEXT_PARALLEL = "context parallelism (ContextParallelConfig / enable_parallelism, added in 0.36.0)"
HAS_CONTEXT_PARALLEL = has("diffusers.ContextParallelConfig")
