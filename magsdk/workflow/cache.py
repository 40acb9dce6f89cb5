"""Find a curve in the user cache (``magsdk.calibration.curve_store``) by id, prefix or path, and turn
it into the calibration entry a strategy module stores."""

from __future__ import annotations

from pathlib import Path

from magsdk.calibration import curve_store
from magsdk.calibration.curve_store import CachedCurve
from magsdk.calibration.drivers import to_entry
from magsdk.config import CalibrationEntry
from magsdk.errors import UsageError


def _listing(found: list[tuple[Path, CachedCurve]]) -> str:
    return "\n".join(f"  {curve_store.describe(path, record)}" for path, record in found)


def find_cached(spec: str) -> tuple[Path, CachedCurve]:
    """The cached curve named by ``spec``: a cache file, a curve id or a unique prefix; "" for the only one."""
    spec = spec.strip()
    if spec and (spec.endswith(".json") or Path(spec).is_file()):
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--from-cache {spec}: no such file")
        try:
            return path, curve_store.load_record(path)
        except ValueError as exc:
            raise UsageError(f"--from-cache {spec}: {exc}") from exc
    found = curve_store.records()
    folder = curve_store.curves_dir()
    if not found:
        raise UsageError(
            f"--from-cache: no cached curve in {folder} (set ${curve_store.CACHE_DIR_ENV} to look elsewhere). "
            "`magsdk.enable(pipe, auto_calibrate=True)` caches one during a first generation; or calibrate with "
            "`magsdk scaffold --model <model>`."
        )
    if not spec:
        if len(found) == 1:
            return found[0]
        first = found[0][0].stem
        raise UsageError(
            f"--from-cache: {len(found)} cached curves in {folder}; name one (its id or a unique start of it), "
            f"e.g. `magsdk scaffold --from-cache {first}`:\n{_listing(found)}"
        )
    matches = [(p, r) for p, r in found if p.stem == spec or r.key.digest() == spec]
    matches = matches or [(p, r) for p, r in found if p.stem.startswith(spec) or r.key.digest().startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    what = "no cached curve" if not matches else f"{len(matches)} cached curves"
    shown = matches or found
    verb = "match" if len(matches) > 1 else "matches"
    raise UsageError(
        f"--from-cache {spec}: {what} in {folder} {verb}; give one of these ids "
        f"(e.g. `magsdk scaffold --from-cache {shown[0][0].stem}`):\n{_listing(shown)}"
    )


def entry_from_record(path: Path, record: CachedCurve) -> CalibrationEntry:
    key = record.key
    source = f"magsdk.enable(auto_calibrate=True), cached curve {path.stem}"
    if record.source:
        source += f": {record.source}"
    entry = to_entry(
        record.result,
        steps=key.num_steps,
        source=source,
        scheduler=key.scheduler,
        shape=f"{key.image_tokens} image tokens",
        synthetic=record.result.synthetic,
    )
    settings: dict[str, object] = {"num_inference_steps": key.num_steps, "image_tokens": key.image_tokens}
    settings.update(key.shift)
    settings["cache_key"] = path.stem
    return entry.model_copy(update={"settings": settings})
