"""Calibration for scaffold / calibrate (``drivers``, ``settings``, ``synthetic``, ``plot``) and the
user cache of curves (``curve_store``).

Nothing is imported here on purpose: the runtime imports ``magsdk.calibration.curve_store``
(stdlib, pydantic and ``magsdk.config`` only), and that must not pull in torch-heavy drivers,
rich or the inspection code. Import from the submodules.
"""
