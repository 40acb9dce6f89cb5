"""The registries magsdk keeps: block class → metadata, transformer class → strategy.

These are the only module-level mutable state in magsdk. Keys are class *names* so that
generated strategy modules need to import nothing but magsdk.

Strategies come from three places, and a more specific one wins for a transformer class:
a strategy defined in code the user ran (``import my_strategies.digits``, a file given by path),
then strategy modules found in the user's folders (``./strategies/`` of the working directory and
every folder in ``$MAGSDK_STRATEGY_PATH``), then the bundled ``strategies`` package.
``StrategyRegistry.resolve`` finds a strategy by transformer class, strategy class, module name,
dotted module path or file path. ``StrategyRegistry.isolated()`` lets code (validation of a
generated module, tests) register strategies and then puts everything back.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import pkgutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar, Literal

from magsdk.config import BlockMetadata
from magsdk.errors import StrategyNotFoundError

if TYPE_CHECKING:
    from magsdk.config import InspectionReport
    from magsdk.strategy import MagCacheStrategy

logger = logging.getLogger(__name__)

#: ``os.pathsep``-separated folders searched for strategy modules (after ``./strategies/``).
STRATEGY_PATH_ENV = "MAGSDK_STRATEGY_PATH"
#: The bundled package of strategies.
BUNDLED_PACKAGE = "strategies"
#: Package name under which strategy files imported by path live in ``sys.modules``.
USER_NAMESPACE = "_magsdk_user_strategies"

Origin = Literal["bundled", "folder", "explicit"]
_RANK: dict[str, int] = {"bundled": 0, "folder": 1, "explicit": 2}

#: The warnings about strategy modules and folders given so far: each is logged once per process.
_warned: set[str] = set()


def _warn_once(message: str, *args: object) -> None:
    """``logger.warning`` unless this very warning was logged before (discovery runs again on every lookup)."""
    text = message % args
    if text not in _warned:
        _warned.add(text)
        logger.warning(text)


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

    @classmethod
    def snapshot(cls) -> dict[str, BlockMetadata]:
        return dict(cls._registry)

    @classmethod
    def restore(cls, snapshot: dict[str, BlockMetadata]) -> None:
        cls._registry.clear()
        cls._registry.update(snapshot)

    @classmethod
    @contextlib.contextmanager
    def isolated(cls) -> Iterator[None]:
        """Register freely inside; on exit the registry is as it was."""
        saved = cls.snapshot()
        try:
            yield
        finally:
            cls.restore(saved)


@dataclass(frozen=True)
class _LoadedFile:
    module: str
    stamp: tuple[int, int]  # (mtime_ns, size): a changed file is imported again


@dataclass
class RegistrySnapshot:
    """Everything ``StrategyRegistry.restore`` puts back (the block registry included)."""

    strategies: dict[str, type[MagCacheStrategy]]
    origins: dict[str, str]
    known: list[type[MagCacheStrategy]]
    discovered: bool
    files: dict[Path, _LoadedFile]
    blocks: dict[str, BlockMetadata] = field(default_factory=dict)


class StrategyRegistry:
    """Transformer class name → strategy class. Strategies register themselves on definition."""

    _registry: ClassVar[dict[str, type[MagCacheStrategy]]] = {}
    #: Where the strategy registered for each transformer class came from (decides who wins).
    _origins: ClassVar[dict[str, str]] = {}
    #: Every strategy class seen, also those another one shadows for their transformer class.
    _known: ClassVar[list[type[MagCacheStrategy]]] = []
    _discovered: ClassVar[bool] = False
    #: Origin of the strategies being defined right now (set while discovery imports modules).
    _origin: ClassVar[str] = "explicit"
    _files: ClassVar[dict[Path, _LoadedFile]] = {}

    @classmethod
    def register(cls, strategy: type[MagCacheStrategy]) -> None:
        """Register ``strategy`` for its transformer class.

        A strategy replaces the registered one unless that one comes from a more specific place:
        discovery never replaces a strategy the user defined or loaded themselves, and the bundled
        package never replaces one found in the user's strategy folders.
        """
        if strategy not in cls._known:
            cls._known.append(strategy)
        name = strategy.transformer_cls_name
        origin = cls._origin
        existing = cls._registry.get(name)
        if existing is not None and existing is not strategy:
            if _RANK[cls._origins.get(name, "explicit")] > _RANK[origin]:
                logger.debug("keeping %s for %s over %s (%s)", existing.__qualname__, name, strategy.__module__, origin)
                for block_name, metadata in strategy.block_metadata.items():  # its blocks still serve others
                    if TransformerBlockRegistry.get(block_name) is None:
                        TransformerBlockRegistry.register(block_name, metadata)
                return
        cls._registry[name] = strategy
        cls._origins[name] = origin
        for block_name, metadata in strategy.block_metadata.items():
            TransformerBlockRegistry.register(block_name, metadata)

    @classmethod
    def get(cls, transformer_cls_name: str) -> type[MagCacheStrategy] | None:
        if transformer_cls_name not in cls._registry:
            discover_strategies()
        return cls._registry.get(transformer_cls_name)

    @classmethod
    def require(cls, spec: str) -> type[MagCacheStrategy]:
        """``resolve`` under the name the runtime has always called (``enable(strategy="...")``)."""
        return cls.resolve(spec)

    @classmethod
    def resolve(cls, spec: str) -> type[MagCacheStrategy]:
        """A strategy by transformer class, strategy class, module name, dotted module or file path.

        Raises ``StrategyNotFoundError`` (a usage error) that lists what is known and what to do.
        """
        spec = spec.strip()
        if _looks_like_path(spec):
            return _strategy_of(load_strategy_file(Path(spec)), spec)
        found = cls._match(spec)
        if found is not None:
            return found
        discover_strategies()
        found = cls._match(spec)
        if found is not None:
            return found
        module = _import_by_name(spec)
        if module is not None:
            return _strategy_of(module, spec)
        raise StrategyNotFoundError(_not_found_message(spec, cls.all()))

    @classmethod
    def _match(cls, spec: str) -> type[MagCacheStrategy] | None:
        if spec in cls._registry:
            return cls._registry[spec]
        for strategy in reversed(cls._known):  # the latest definition first
            module = strategy.__module__
            if spec in (strategy.__name__, module, module.rsplit(".", 1)[-1]):
                return strategy
        return None

    @classmethod
    def all(cls) -> dict[str, type[MagCacheStrategy]]:
        """Transformer class → the strategy ``enable`` would use, after discovery."""
        discover_strategies()
        return dict(cls._registry)

    @classmethod
    def known(cls) -> list[type[MagCacheStrategy]]:
        """Every strategy class found, also those shadowed by a more specific one for their class."""
        discover_strategies()
        return list(cls._known)

    @classmethod
    def origin(cls, transformer_cls_name: str) -> str | None:
        """"explicit", "folder" or "bundled": where the registered strategy came from."""
        return cls._origins.get(transformer_cls_name)

    # -- snapshot / restore ---------------------------------------------------------------------
    @classmethod
    def snapshot(cls) -> RegistrySnapshot:
        return RegistrySnapshot(
            strategies=dict(cls._registry),
            origins=dict(cls._origins),
            known=list(cls._known),
            discovered=cls._discovered,
            files=dict(cls._files),
            blocks=TransformerBlockRegistry.snapshot(),
        )

    @classmethod
    def restore(cls, snapshot: RegistrySnapshot) -> None:
        cls._registry.clear()
        cls._registry.update(snapshot.strategies)
        cls._origins.clear()
        cls._origins.update(snapshot.origins)
        cls._known[:] = snapshot.known
        cls._discovered = snapshot.discovered
        cls._files.clear()
        cls._files.update(snapshot.files)
        TransformerBlockRegistry.restore(snapshot.blocks)

    @classmethod
    def reset(cls) -> None:
        """Forget every strategy and block class, and that discovery ran (use inside ``isolated()``)."""
        cls.restore(RegistrySnapshot(strategies={}, origins={}, known=[], discovered=False, files={}, blocks={}))

    @classmethod
    @contextlib.contextmanager
    def isolated(cls) -> Iterator[None]:
        """Import or define strategies inside; on exit both registries are as they were."""
        saved = cls.snapshot()
        try:
            yield
        finally:
            cls.restore(saved)


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


# -- discovery --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _defining(origin: Origin) -> Iterator[None]:
    previous = StrategyRegistry._origin
    StrategyRegistry._origin = origin
    try:
        yield
    finally:
        StrategyRegistry._origin = previous


def _register_module(module: ModuleType) -> list[type[MagCacheStrategy]]:
    """(Re-)register the strategies a module defines: an already imported module does not run again."""
    found = strategies_of_module(module)
    for strategy in found:
        StrategyRegistry.register(strategy)
    return found


def strategies_of_module(module: ModuleType) -> list[type[MagCacheStrategy]]:
    """The strategy classes defined in ``module`` (not those it imports), in definition order."""
    from magsdk.strategy import MagCacheStrategy

    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, MagCacheStrategy)
        and obj.__module__ == module.__name__
        and obj.transformer_cls_name
    ]


def discover_strategies(package: str = BUNDLED_PACKAGE) -> list[str]:
    """Import the bundled ``strategies`` package, then every strategy module in the user's folders.

    With another ``package`` only that package is imported. Returns the modules imported now.
    """
    if package != BUNDLED_PACKAGE:
        with _defining("explicit"):
            return _import_package(package)
    imported: list[str] = []
    if not StrategyRegistry._discovered:
        StrategyRegistry._discovered = True
        with _defining("bundled"):
            imported += _import_package(BUNDLED_PACKAGE)
    with _defining("folder"):
        for folder in search_folders():
            imported += _import_folder(folder)
    return imported


def _import_package(package: str) -> list[str]:
    if package == BUNDLED_PACKAGE:
        serve_bundled_package()
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        logger.debug("strategy package %r is not importable", package)
        return []
    imported: list[str] = []
    folders = [str(p) for p in bundled_folders()] if package == BUNDLED_PACKAGE else getattr(pkg, "__path__", [])
    for info in pkgutil.iter_modules(folders):
        if info.name.startswith("_"):
            continue
        name = f"{package}.{info.name}"
        try:
            _register_module(importlib.import_module(name))
            imported.append(name)
        except Exception as exc:  # a broken strategy module must not hide the others
            _warn_once("could not import strategy module %s: %s", name, exc)
    return imported


def _installed_bundled_folder() -> Path | None:
    """The bundled package's folder: installed next to ``magsdk`` (a wheel's site-packages, an editable checkout)."""
    folder = Path(__file__).resolve().parent.parent / BUNDLED_PACKAGE
    return folder if (folder / "__init__.py").is_file() else None


def serve_bundled_package() -> None:
    """Keep ``import strategies.flux`` working when the working directory has a ``strategies/`` folder.

    Such a folder (``magsdk scaffold``'s default output, no ``__init__.py``) is a namespace package, and in an
    editable install Python's path finder takes it for ``strategies`` before setuptools' editable finder is
    asked: the bundled strategies would vanish. The bundled folder is then put first on that namespace's path,
    so both are served. A user's own regular package named ``strategies`` is left alone.
    """
    folder = _installed_bundled_folder()
    if folder is None:
        return
    module = sys.modules.get(BUNDLED_PACKAGE)
    if module is None:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
        if spec is None or spec.origin is not None:  # absent, or a regular package: nothing to add
            return
        module = importlib.import_module(BUNDLED_PACKAGE)  # a namespace: runs no code
    if getattr(module, "__file__", None) is None and str(folder) not in list(getattr(module, "__path__", [])):
        # first, so `strategies.flux` is the bundled module even next to a copy in ./strategies/ (magsdk imports
        # the folder's own modules by path); a plain list, as a namespace path would recompute itself
        module.__path__ = [str(folder), *module.__path__]
        logger.debug("the bundled strategies %s are served next to the namespace package %s", folder, module.__path__)


def bundled_folders() -> list[Path]:
    """The folders of the bundled ``strategies`` package (never scanned twice as a user folder)."""
    installed = _installed_bundled_folder()
    if installed is not None:
        return [installed]
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    return [Path(p).resolve() for p in (locations or [])]


def bundled_module_names() -> set[str]:
    """Module names of the bundled strategies (``flux``, ``flux2_klein``), found without importing them."""
    return {info.name for info in pkgutil.iter_modules([str(p) for p in bundled_folders()])}


def _strategy_path_entries() -> list[str]:
    return [p for p in os.environ.get(STRATEGY_PATH_ENV, "").split(os.pathsep) if p.strip()]


def _not_folders(entries: list[str]) -> list[str]:
    """The entries of ``$MAGSDK_STRATEGY_PATH`` that are no folder, each with why."""
    return [
        f"{p} {'is not a folder' if Path(p).exists() else 'does not exist'}" for p in entries if not Path(p).is_dir()
    ]


def search_folders() -> list[Path]:
    """``./strategies/`` of the working directory, then ``$MAGSDK_STRATEGY_PATH``; existing, bundled left out."""
    entries = _strategy_path_entries()
    for entry in _not_folders(entries):
        _warn_once("$%s: %s, so no strategy is searched there; fix or remove the entry", STRATEGY_PATH_ENV, entry)
    candidates = [Path.cwd() / "strategies"]
    candidates += [Path(p) for p in entries]
    bundled = set(bundled_folders())
    folders: list[Path] = []
    for folder in candidates:
        resolved = folder.resolve()
        if resolved.is_dir() and resolved not in bundled and resolved not in folders:
            folders.append(resolved)
    return folders


def _import_folder(folder: Path) -> list[str]:
    imported: list[str] = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith(("_", "test_")) or path.name == "conftest.py":
            continue
        try:
            module = _load_file(path, "folder")
        except Exception as exc:  # a broken user module must not hide the others
            _warn_once("could not import strategy module %s: %s", path, exc)
            continue
        if module is not None:
            imported.append(module.__name__)
    return imported


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _module_name_for(path: Path) -> str:
    """``_magsdk_user_strategies.<stem>``; a second file with the same stem gets a path digest."""
    name = f"{USER_NAMESPACE}.{path.stem}"
    taken = {loaded.module for p, loaded in StrategyRegistry._files.items() if p != path}
    if name in taken:
        name += "_" + hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return name


def _load_file(path: Path, origin: Origin) -> ModuleType | None:
    """Import a strategy file once (again when it changed); None when it is already loaded as is."""
    resolved = path.resolve()
    stamp = _stamp(resolved)
    loaded = StrategyRegistry._files.get(resolved)
    if loaded is not None and loaded.stamp == stamp and loaded.module in sys.modules:
        module = sys.modules[loaded.module]
        with _defining(origin):
            _register_module(module)
        return module if origin == "explicit" else None
    name = loaded.module if loaded is not None else _module_name_for(resolved)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise StrategyNotFoundError(f"{path}: not a Python module file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic and dataclasses look the module up while its body runs
    try:
        with _defining(origin):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    StrategyRegistry._files[resolved] = _LoadedFile(name, stamp)
    return module


def load_strategy_file(path: Path) -> ModuleType:
    """Import a strategy module from its path (its strategies register, winning for their class)."""
    if path.is_dir():
        raise StrategyNotFoundError(
            f"strategy {path} is a folder; give a strategy module file (path/to/module.py, e.g. one written by "
            "`magsdk scaffold`), a strategy module name, a transformer or strategy class name, or a variant name "
            f"(`magsdk list` shows them). To find the strategy modules in a folder by name, add it to "
            f"${STRATEGY_PATH_ENV}"
        )
    if not path.is_file():
        raise StrategyNotFoundError(
            f"strategy file {path} does not exist; give the path of a strategy module (e.g. one written by "
            "`magsdk scaffold`), a strategy module name, or a transformer class name"
        )
    try:
        module = _load_file(path, "explicit")
    except StrategyNotFoundError:
        raise
    except Exception as exc:
        raise StrategyNotFoundError(f"strategy file {path} does not import: {type(exc).__name__}: {exc}") from exc
    assert module is not None
    return module


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _import_by_name(spec: str) -> ModuleType | None:
    """``pkg.module`` importable from ``sys.path``, else ``<folder>/pkg/module.py`` from the working
    directory or a strategy folder (the ``magsdk`` console script does not put the working directory
    on ``sys.path``)."""
    parts = spec.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    for folder in [Path.cwd(), *search_folders()]:
        candidate = folder.joinpath(*parts).with_suffix(".py")
        if candidate.is_file():
            return load_strategy_file(candidate)
    try:
        with _defining("explicit"):
            module = importlib.import_module(spec)
    except ImportError:
        return None
    _register_module(module)
    return module


def _strategy_of(module: ModuleType, spec: str) -> type[MagCacheStrategy]:
    found = strategies_of_module(module)
    if not found:
        where = getattr(module, "__file__", None) or module.__name__
        raise StrategyNotFoundError(
            f"{spec!r} ({where}) defines no MagCacheStrategy subclass with a transformer_cls_name; "
            "give a strategy module (`magsdk scaffold` writes one) or a transformer class name"
        )
    return found[0]


def _searched_folders() -> str:
    """The strategy folders, for an error: ``./strategies/`` and ``$MAGSDK_STRATEGY_PATH``'s value, and which of
    them do not exist."""
    local = Path.cwd() / "strategies"
    text = f"./strategies/ ({local}{'' if local.is_dir() else ' does not exist'})"
    raw = os.environ.get(STRATEGY_PATH_ENV, "")
    if not raw.strip():
        return text + f" and ${STRATEGY_PATH_ENV} (not set)"
    text += f" and ${STRATEGY_PATH_ENV}={raw!r}"
    missing = _not_folders(_strategy_path_entries())
    if missing:
        text += f" (not found: {', '.join(missing)}; list existing folders separated by {os.pathsep!r})"
    return text


def _not_found_message(spec: str, registered: dict[str, type[MagCacheStrategy]]) -> str:
    known = ", ".join(
        f"{cls.__module__.rsplit('.', 1)[-1]} ({name})" for name, cls in sorted(registered.items())
    ) or "none"
    return (
        f"no MagCache strategy found for {spec!r}: it is neither a transformer class with a registered "
        f"strategy, a strategy class or module name, nor a strategy file. Known strategies: {known} "
        f"(`magsdk list` shows them). Strategy folders searched: {_searched_folders()}. For a model without a "
        "strategy: `magsdk.enable(pipe, auto_calibrate=True)` measures "
        "its curve during the first generation(s), or `magsdk scaffold --model <model>` writes a calibrated "
        "strategy module (`magsdk inspect <model>` shows the block conventions it would use); a strategy "
        "file's path or module name works too."
    )
