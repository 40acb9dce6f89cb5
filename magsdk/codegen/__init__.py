"""Code generation: render strategy modules from templates, patch their calibration, validate them.

Nothing here is imported by the runtime: ``magsdk.enable`` stays free of jinja2 and libcst.
"""

from magsdk.codegen.literal import format_calibrations, format_entry, round_entry
from magsdk.codegen.patch import StrategyFileError, read_calibrations, upsert_calibration
from magsdk.codegen.render import (
    StrategySpec,
    TemplateRenderError,
    default_module_name,
    render_strategy,
    render_test,
    spec_from_report,
    spec_from_strategy,
)
from magsdk.codegen.validate import (
    ModuleCheck,
    StrategyValidationError,
    import_from_path,
    isolated_registry,
    load_strategy,
    strategies_in,
    validate_strategy_text,
    write_validated,
)

__all__ = [
    "ModuleCheck",
    "StrategyFileError",
    "StrategySpec",
    "StrategyValidationError",
    "TemplateRenderError",
    "default_module_name",
    "format_calibrations",
    "format_entry",
    "import_from_path",
    "isolated_registry",
    "load_strategy",
    "read_calibrations",
    "render_strategy",
    "render_test",
    "round_entry",
    "spec_from_report",
    "spec_from_strategy",
    "strategies_in",
    "upsert_calibration",
    "validate_strategy_text",
    "write_validated",
]
