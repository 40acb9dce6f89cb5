"""Turn a TARGET string into a transformer class (and the config it was published with, if any).

TARGET forms, tried in this order:

- ``path/to/file.py:Class``  a class in a Python file;
- ``path/to/folder``         a transformer folder (``config.json`` with ``_class_name``) or a
  pipeline folder (``model_index.json`` → its ``transformer`` entry and ``transformer/config.json``);
  a ``config.json`` file works too;
- ``pkg.module:Class`` or ``pkg.module.Class``;
- ``FluxTransformer2DModel``  a class that ``diffusers`` exports;
- ``org/name``               a Hugging Face Hub id: only its transformer config is fetched, through
  diffusers' own config loading. Offline this fails fast with a message naming the local-folder form.

Only configs are read here, never weights: inspection builds the class small (``shrink.py``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import torch

from magsdk.errors import UsageError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FORMS = (
    "TARGET can be a diffusers class name (FluxTransformer2DModel), pkg.module:Class, path/to/file.py:Class, "
    "a local model folder (with config.json or model_index.json), or a Hugging Face Hub id"
)


@dataclass
class ResolvedTarget:
    """A transformer class and the configuration found with it (None: use the class defaults)."""

    cls: type[torch.nn.Module]
    config: dict[str, Any] | None
    source: str  # "diffusers", "module", "file", "folder", "hub"
    location: str


def resolve_target(target: str) -> ResolvedTarget:
    """Resolve TARGET (see the module docstring); ``UsageError`` with the reason when it cannot."""
    target = target.strip()
    if not target:
        raise UsageError(f"empty TARGET. {_FORMS}.")
    file_part, _, attr = target.rpartition(":")
    if file_part.endswith(".py") and attr:
        cls = _class_from_file(Path(file_part), attr, target)
        return ResolvedTarget(_check_module_class(cls, target), None, "file", target)
    if target.endswith(".py"):
        raise UsageError(f"{target!r} names a file but no class; write path/to/file.py:ClassName")
    path = Path(target)
    if path.is_dir():
        return _from_folder(path)
    if path.is_file() and path.suffix == ".json":
        return _from_config_file(path, target)
    if ":" in target:
        module_name, _, attr = target.partition(":")
        return ResolvedTarget(_check_module_class(_class_from_module(module_name, attr, target), target), None,
                              "module", target)
    if target.isidentifier():
        return ResolvedTarget(_check_module_class(_diffusers_class(target), target), None, "diffusers", target)
    if "/" not in target and "." in target:
        module_name, _, attr = target.rpartition(".")
        return ResolvedTarget(_check_module_class(_class_from_module(module_name, attr, target), target), None,
                              "module", target)
    if _HUB_ID.match(target) and not target.startswith((".", "/")):
        return _from_hub(target)
    raise UsageError(f"{target!r} is not an existing folder, file or importable class. {_FORMS}.")


# -- classes ------------------------------------------------------------------------------------------------
def _check_module_class(obj: Any, target: str) -> type[torch.nn.Module]:
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    what = f"the class {obj.__module__}.{obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
    hint = ""
    if isinstance(obj, type) and obj.__name__.endswith("Pipeline"):
        hint = " It is a pipeline; inspect its transformer class instead (e.g. FluxTransformer2DModel)."
    raise UsageError(
        f"{target!r} is {what}, not a torch.nn.Module subclass; inspect needs a transformer model class.{hint}"
    )


def _diffusers_class(name: str) -> Any:
    import diffusers

    try:
        return getattr(diffusers, name)
    except (AttributeError, ImportError, RuntimeError) as exc:
        known = [n for n in dir(diffusers) if "Transformer" in n or n.endswith("Model")]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UsageError(
            f"diffusers {diffusers.__version__} has no class named {name!r}.{hint} {_FORMS}."
        ) from exc


def _class_from_module(module_name: str, attr: str, target: str) -> Any:
    if not module_name or not attr:
        raise UsageError(f"{target!r}: expected pkg.module:Class. {_FORMS}.")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import module {module_name!r} (from {target!r}): {type(exc).__name__}: {exc}"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise UsageError(f"module {module_name!r} has no attribute {attr!r} (from {target!r})") from exc


def load_file_module(path: Path, what: str) -> ModuleType:
    """Import a Python file by path (under a private module name, registered so dataclasses work)."""
    if not path.is_file():
        raise UsageError(f"{what}: no such file {str(path)!r}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"_magsdk_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise UsageError(f"{what}: {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise UsageError(f"{what}: importing {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
    return module


def _class_from_file(path: Path, attr: str, target: str) -> Any:
    module = load_file_module(path, target)
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        names = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)]
        raise UsageError(
            f"{str(path)!r} defines no {attr!r} (nn.Module classes in it: {', '.join(names) or 'none'})"
        ) from exc


def _class_by_name(name: str, library: str, where: str) -> type[torch.nn.Module]:
    if library in ("diffusers", ""):
        return _check_module_class(_diffusers_class(name), f"{where}: {name}")
    return _check_module_class(_class_from_module(library, name, f"{library}.{name}"), f"{where}: {name}")


# -- folders and config files -----------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} holds a {type(data).__name__}, expected a JSON object")
    return data


def _split_config(data: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    name = data.get("_class_name")
    if not isinstance(name, str):
        raise UsageError(f"{where} has no '_class_name'; it is not a diffusers model config. {_FORMS}.")
    return name, {k: v for k, v in data.items() if not k.startswith("_")}


def _from_config_file(path: Path, target: str) -> ResolvedTarget:
    name, config = _split_config(_read_json(path), str(path))
    return ResolvedTarget(_class_by_name(name, "diffusers", str(path)), config, "folder", target)


def _from_folder(folder: Path) -> ResolvedTarget:
    config_file = folder / "config.json"
    index_file = folder / "model_index.json"
    if config_file.is_file():
        return _from_config_file(config_file, str(folder))
    if index_file.is_file():
        index = _read_json(index_file)
        entry = index.get("transformer")
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
            raise UsageError(
                f"{str(index_file)!r} has no 'transformer' component (components: {', '.join(components)}); "
                "pass the folder of the transformer you want to inspect"
            )
        library, name = entry
        sub = folder / "transformer" / "config.json"
        if not sub.is_file():
            raise UsageError(f"pipeline folder {str(folder)!r} names {name} but has no transformer/config.json")
        _, config = _split_config(_read_json(sub), str(sub))
        return ResolvedTarget(_class_by_name(name, library, str(index_file)), config, "folder", str(folder))
    raise UsageError(
        f"folder {str(folder)!r} has neither config.json (a model folder) nor model_index.json (a pipeline folder)"
    )


# -- the Hub ------------------------------------------------------------------------------------------------
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hub endpoint be reached? Checked in a thread so that DNS cannot stall inspect."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _load_hub_config(repo_id: str, subfolder: str | None, local_only: bool) -> dict[str, Any]:
    # the file itself, as diffusers' from_pretrained finds it (cache first); no diffusers class is needed to read it
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id, "config.json", subfolder=subfolder, local_files_only=local_only)
    with open(path, encoding="utf-8") as handle:
        return dict(json.load(handle))


def _from_hub(repo_id: str) -> ResolvedTarget:
    last_error: Exception | None = None
    for local_only in (True, False):
        if not local_only and not _hub_reachable():
            local = repo_id.rsplit("/", 1)[-1]
            raise UsageError(
                f"{repo_id!r} looks like a Hugging Face Hub id, but its config is not in the local cache and the Hub "
                "cannot be reached (offline?). The transformer's config is all inspect needs: on a machine with "
                f"network run `hf download {repo_id} transformer/config.json --local-dir {local}`, bring the folder "
                f"here and run `magsdk inspect {local}/transformer`; or pass the transformer's class name with its "
                "config: `magsdk inspect <TransformerClass> --config config.json`."
            ) from last_error
        for subfolder in ("transformer", None):
            try:
                data = _load_hub_config(repo_id, subfolder, local_only)
            except Exception as exc:  # not cached / no such subfolder / no such repo
                last_error = exc
                continue
            name, config = _split_config(data, f"{repo_id} ({subfolder or 'root'}/config.json)")
            return ResolvedTarget(_class_by_name(name, "diffusers", repo_id), config, "hub", repo_id)
    raise UsageError(
        f"could not load a transformer config from the Hub repository {repo_id!r}: {last_error}. "
        "Check the id, or pass a local folder."
    ) from last_error
