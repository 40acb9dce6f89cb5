"""The two registries magsdk keeps: block class → metadata, transformer class → strategy.

These are the only module-level mutable state in magsdk. Keys are class *names* so that
generated strategy modules need to import nothing but magsdk.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import TYPE_CHECKING, ClassVar

from magsdk.config import BlockMetadata
from magsdk.errors import StrategyNotFoundError

if TYPE_CHECKING:
    from magsdk.config import InspectionReport
    from magsdk.strategy import MagCacheStrategy

logger = logging.getLogger(__name__)


class TransformerBlockRegistry:
    """Block class name → ``BlockMetadata`` (how to find the hidden state in and out of a block)."""

    _registry: ClassVar[dict[str, BlockMetadata]] = {}

    @classmethod
    def register(cls, block_cls_name: str, metadata: BlockMetadata) -> None:
        cls._registry[block_cls_name] = metadata

    @classmethod
    def get(cls, block_cls_name: str) -> BlockMetadata | None:
        return cls._registry.get(block_cls_name)

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)


class StrategyRegistry:
    """Transformer class name → strategy class. Strategies register themselves on definition."""

    _registry: ClassVar[dict[str, type[MagCacheStrategy]]] = {}
    _discovered: ClassVar[bool] = False

    _discovering: ClassVar[bool] = False

    @classmethod
    def register(cls, strategy: type[MagCacheStrategy]) -> None:
        """A strategy defined later replaces an earlier one, except that discovery of the bundled
        ``strategies`` package never replaces one the user registered first (their own module wins)."""
        name = strategy.transformer_cls_name
        existing = cls._registry.get(name)
        if cls._discovering and existing is not None and existing.__module__ != strategy.__module__:
            logger.debug("keeping %s for %s over bundled %s", existing.__qualname__, name, strategy.__module__)
            return
        cls._registry[name] = strategy
        for block_name, metadata in strategy.block_metadata.items():
            TransformerBlockRegistry.register(block_name, metadata)

    @classmethod
    def get(cls, transformer_cls_name: str) -> type[MagCacheStrategy] | None:
        if transformer_cls_name not in cls._registry:
            discover_strategies()
        return cls._registry.get(transformer_cls_name)

    @classmethod
    def require(cls, transformer_cls_name: str) -> type[MagCacheStrategy]:
        strategy = cls.get(transformer_cls_name)
        if strategy is None:
            known = ", ".join(sorted(cls._registry)) or "(none)"
            raise StrategyNotFoundError(
                f"no MagCache strategy is registered for transformer class {transformer_cls_name!r}. "
                f"Known strategies: {known}. Run `magsdk inspect {transformer_cls_name}` to see its block "
                f"conventions and `magsdk scaffold --model <model>` to generate a strategy, or pass "
                "config=MagCacheConfig(mag_ratios=...) to magsdk.enable()."
            )
        return strategy

    @classmethod
    def all(cls) -> dict[str, type[MagCacheStrategy]]:
        discover_strategies()
        return dict(cls._registry)


class InferredReportRegistry:
    """Transformer class → the conventions its first traced call showed (``enable`` without a strategy)."""

    _registry: ClassVar[dict[type, InspectionReport]] = {}

    @classmethod
    def register(cls, transformer_cls: type, report: InspectionReport) -> None:
        cls._registry[transformer_cls] = report

    @classmethod
    def get(cls, transformer_cls: type) -> InspectionReport | None:
        return cls._registry.get(transformer_cls)

    @classmethod
    def forget(cls, transformer_cls: type | None = None) -> None:
        if transformer_cls is None:
            cls._registry.clear()
        else:
            cls._registry.pop(transformer_cls, None)


def discover_strategies(package: str = "strategies") -> list[str]:
    """Import every module of the ``strategies`` package so that its strategies register."""
    if StrategyRegistry._discovered and package == "strategies":
        return []
    StrategyRegistry._discovered = package == "strategies" or StrategyRegistry._discovered
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        logger.debug("strategy package %r is not importable", package)
        return []
    imported: list[str] = []
    StrategyRegistry._discovering = True
    try:
        for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            if info.name.startswith("_"):
                continue
            name = f"{package}.{info.name}"
            try:
                importlib.import_module(name)
                imported.append(name)
            except Exception as exc:  # a broken user strategy must not hide the others
                logger.warning("could not import strategy module %s: %s", name, exc)
    finally:
        StrategyRegistry._discovering = False
    return imported
