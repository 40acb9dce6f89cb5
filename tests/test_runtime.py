"""Runtime behaviour beyond parity: traps 2-7 of docs/design.md, handles, stats, calibration, errors."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers_features import MAG_CACHE, require
from tiny_models import ComputeRecorder, denoise, flux_inputs, fresh_copy, tiny_flux

import magsdk
from magsdk.errors import BlockLayoutError, StrategyNotFoundError
from strategies.flux import VARIANTS

FLUX_RATIOS = VARIANTS[0]["calibrations"][0]["branches"]["default"]  # flux.1-dev
FAST = dict(threshold=0.24, max_skip_steps=5, retention_ratio=0.1)


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    return tiny_flux()


def test_enable_with_registered_strategy_and_no_config(flux):
    model = fresh_copy(flux)
    with magsdk.enable(model) as handle:
        assert type(handle.strategy).__name__ == "FluxStrategy"
        denoise(model, 28)
        assert handle.stats.computed_calls + handle.stats.skipped_calls == 28
        assert handle.stats.skipped_calls > 0
    assert "forward" not in model.__dict__  # disabled on exit: hooks removed


def test_single_block_model_skips_and_is_repeatable():
    """docs/design.md trap 3: one block plays head and tail; two generations in a row give identical outputs."""
    model = tiny_flux(layers=1, single_layers=0)
    plain = denoise(fresh_copy(model), 28)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    assert handle.blocks == ["transformer_blocks.0 (head+tail)"]
    recorder = ComputeRecorder(model, model.transformer_blocks[0])
    first = denoise(model, 28)
    second = denoise(model, 28)
    per_generation = recorder.flags[:28], recorder.flags[28:]
    assert per_generation[0] == per_generation[1]
    assert sum(per_generation[0]) < 28  # the block really did not run on skipped steps
    assert handle.stats.generations() == [0, 1]
    assert torch.equal(first, second)
    assert not torch.allclose(first, plain, atol=1e-5)


def test_skipped_step_runs_no_block_and_adds_residual_once(flux):
    """On a skipped step no block is entered (not even the first or last); the stack's output is x_in + residual."""
    model = fresh_copy(flux)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    entered: dict[str, int] = {}
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=i: entered.__setitem__(str(i), entered.get(str(i), 0) + 1))
    stack_in: list[torch.Tensor] = []
    stack_out: list[torch.Tensor] = []
    model.x_embedder.register_forward_hook(lambda m, a, out: stack_in.append(out))
    model.norm_out.register_forward_pre_hook(lambda m, a: stack_out.append(a[0]))
    denoise(model, 28)
    computed, skipped = handle.stats.computed_steps(), handle.stats.skipped_steps()
    assert skipped
    assert entered == {str(i): len(computed) for i in range(len(blocks))}  # no block hook fired on a skip
    for step in skipped:  # stack output on a skipped step == its input + residual of the last computed step
        last = max(s for s in computed if s < step)
        residual = stack_out[last] - stack_in[last]
        assert torch.allclose(stack_out[step], stack_in[step] + residual, atol=1e-6)


def test_generation_that_raises_does_not_affect_the_next(flux):
    """docs/design.md trap 5: state does not survive an exception or an early stop."""
    model = fresh_copy(flux)
    magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    clean = denoise(model, 28)
    with pytest.raises(RuntimeError, match="stopped at step 17"):
        denoise(model, 28, raise_at=17)
    assert torch.equal(denoise(model, 28), clean)

    class Boom(Exception):
        pass

    def explode(*args, **kwargs):
        raise Boom("inside the block stack")

    single = model.single_transformer_blocks[0]
    hooked = single.forward
    single.forward = explode
    with pytest.raises(Boom):
        denoise(model, 28)
    single.forward = hooked
    assert torch.equal(denoise(model, 28), clean)


def test_enable_twice_replaces_and_disable_restores(flux):
    model = fresh_copy(flux)
    plain = denoise(model, 28)
    magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS))
    second = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    once = fresh_copy(flux)
    magsdk.enable(once, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST))
    assert torch.equal(denoise(model, 28), denoise(once, 28))
    assert second.stats.total_calls == 28
    second.disable()
    assert torch.equal(denoise(model, 28), plain)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_cfg_branches_share_one_schedule_by_default(flux):
    """Two branch curves: by default both passes follow their mean and skip the same steps."""
    other = [1.0] + [r * 1.02 for r in FLUX_RATIOS[1:]]
    model = fresh_copy(flux)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios={"pass0": FLUX_RATIOS, "pass1": other}, **FAST))
    denoise(model, 28, cfg=True)
    mean = [(a + b) / 2 for a, b in zip(FLUX_RATIOS, other, strict=True)]
    expected = magsdk.plan(mean, handle.config, 28).computed_steps
    assert handle.stats.computed_steps("pass0") == handle.stats.computed_steps("pass1") == expected
    own = [magsdk.plan(curve, handle.config, 28).computed_steps for curve in (FLUX_RATIOS, other)]
    assert own[0] != own[1]  # on their own curves the two passes would skip different steps


def test_per_branch_curves_are_used(flux):
    """per_branch_curves=True gives each CFG branch its own schedule."""
    flat = [1.0] * 28
    model = fresh_copy(flux)
    handle = magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios={"pass0": FLUX_RATIOS, "pass1": flat},
                                                        per_branch_curves=True, **FAST))
    denoise(model, 28, cfg=True)
    table = handle.stats.per_branch()
    assert set(table) == {"pass0", "pass1"}
    assert handle.stats.computed_steps("pass0") == magsdk.plan(FLUX_RATIOS, handle.config, 28).computed_steps
    assert handle.stats.computed_steps("pass1") == magsdk.plan(flat, handle.config, 28).computed_steps
    assert handle.stats.computed_steps("pass0") != handle.stats.computed_steps("pass1")


def test_two_transformers_share_one_schedule(flux):
    """docs/design.md trap 7 (Wan 2.2): the second transformer joins mid-schedule and must know the global step."""
    high, low = fresh_copy(flux), fresh_copy(flux)
    scheduler = FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(transformer=high, transformer_2=low, scheduler=scheduler)
    # retention 0.3: the first transformer keeps int(0.3·28+0.5) = 8 steps, the second int(0.3·14+0.5) = 4
    settings = dict(FAST, retention_ratio=0.3)
    handle = magsdk.enable(pipe, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **settings))
    scheduler.set_timesteps(28)
    latents = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    cond = flux_inputs(high)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            model = high if i < 14 else low
            pred = model(hidden_states=latents, timestep=t.expand(1) / 1000, **cond)[0]
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    by_module = {m: [c.step for c in handle.stats.calls if c.module == m] for m in ("transformer", "transformer_2")}
    assert by_module["transformer"] == list(range(14))
    assert by_module["transformer_2"] == list(range(14, 28))
    high_computed = handle.stats.computed_steps("pass0", module="transformer")
    low_computed = handle.stats.computed_steps("pass0", module="transformer_2")
    high_plan = handle.plan(28, "pass0", module="transformer").computed_steps  # of all 28 steps: it ran 0..13
    assert high_computed == [s for s in high_plan if s < 14]
    assert low_computed == handle.plan(28, "pass0", module="transformer_2", first_step=14).computed_steps
    assert high_computed[:8] == list(range(8)) and 8 not in high_computed  # retention, then the threshold rule
    # the second transformer restarts the retention window at its first step: 14..17 computed, then it may skip
    assert low_computed[:4] == list(range(14, 18)) and 18 not in low_computed


def test_calibrate_records_every_branch_and_matches_diffusers(flux, capsys, tmp_path):
    model = fresh_copy(flux)
    with magsdk.calibrate(model) as cal:
        denoise(model, 12)
    result = cal.result
    assert result is not None and list(result.branches) == ["pass0"]
    branch = result.branches["pass0"]
    assert len(branch.norm_ratios) == len(branch.cos_dists) == len(branch.timesteps) == 12
    assert branch.norm_ratios[0] == 1.0 and all(r > 0 for r in branch.norm_ratios)
    assert branch.timesteps[0] > branch.timesteps[-1]

    path = result.save(tmp_path / "cal.json")
    assert magsdk.CalibrationResult.load(path) == result
    config = magsdk.MagCacheConfig(mag_ratios=result)
    assert config.mag_ratios == {"pass0": branch.norm_ratios}

    # the same ratios as diffusers' own calibration (skipped, saying so, where diffusers lacks MagCache)
    apply_mag_cache = require("diffusers.hooks.apply_mag_cache", MAG_CACHE)
    DiffusersMagCacheConfig = require("diffusers.hooks.MagCacheConfig", MAG_CACHE)
    reference = fresh_copy(flux)
    apply_mag_cache(reference, DiffusersMagCacheConfig(calibrate=True, num_inference_steps=12))
    capsys.readouterr()
    denoise(reference, 12)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    theirs = [float(v) for v in printed.strip("[]").split(",")]
    assert branch.norm_ratios == pytest.approx(theirs, abs=1e-6)


def test_calibrate_cfg_finds_two_branches_and_averages_generations(flux):
    model = fresh_copy(flux)
    with magsdk.calibrate(model) as cal:
        denoise(model, 8, cfg=True, seed=0)
        denoise(model, 8, cfg=True, seed=1)
    result = cal.result
    assert result is not None and set(result.branches) == {"pass0", "pass1"}
    assert all(b.num_runs == 2 and len(b.norm_ratio_spread) == 8 for b in result.branches.values())
    assert result.branches["pass0"].norm_ratios != result.branches["pass1"].norm_ratios


def test_unknown_transformer_error_lists_strategies_and_names_inspect():
    class MyTransformer(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            return hidden_states

    with pytest.raises(StrategyNotFoundError) as info:
        magsdk.enable(MyTransformer())
    message = str(info.value)
    assert "MyTransformer" in message and "FluxTransformer2DModel" in message and "magsdk inspect" in message


@pytest.mark.parametrize(
    ("ratios", "needle"),
    [([1.0, float("nan"), 1.0], "nan"), ([1.0, -0.5], "-0.5"), ([1.0], "at least 2"), ([1.0, 0.0], "0.0")],
)
def test_bad_ratios_are_rejected_with_the_field_and_value(ratios, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        magsdk.MagCacheConfig(mag_ratios=ratios)
    assert "mag_ratios" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", -0.1), ("max_skip_steps", -1), ("retention_ratio", 1.0), ("num_inference_steps", 0)],
)
def test_bad_settings_name_the_field(field, value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **{field: value})
    assert field in str(info.value)


def test_block_output_that_does_not_match_metadata_is_an_error(flux):
    """docs/design.md trap 4: never return the input unchanged while reporting success."""
    wrong = {
        "FluxTransformerBlock": magsdk.BlockMetadata(encoder_hidden_states_argument_name="encoder_hidden_states",
                                                     return_hidden_states_index=1,
                                                     return_encoder_hidden_states_index=0),
        "FluxSingleTransformerBlock": magsdk.BlockMetadata(output_kind="tensor"),  # really a tuple
    }
    model = fresh_copy(flux)
    magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS), strategy=magsdk.MagCacheStrategy(),
                  metadata=wrong)
    with pytest.raises(BlockLayoutError, match="does not match its metadata"):
        denoise(model, 4)


def test_fused_output_without_declared_layout_is_an_error():
    """A tail that returns more tokens than the head received needs a declared fused layout."""
    from tiny_models import tiny_flux2

    from strategies.flux2_klein import Flux2KleinStrategy

    metadata = dict(Flux2KleinStrategy.block_metadata)
    metadata["Flux2SingleTransformerBlock"] = metadata["Flux2SingleTransformerBlock"].model_copy(
        update={"fused_sequence_order": None})
    model = tiny_flux2()
    magsdk.enable(model, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS), strategy=magsdk.MagCacheStrategy(),
                  metadata=metadata)
    with pytest.raises(BlockLayoutError, match="fused"):
        denoise(model, 4)


def test_wrong_hidden_argument_name_is_an_error(flux):
    wrong = {name: magsdk.BlockMetadata(hidden_states_argument_name="x")
             for name in ("FluxTransformerBlock", "FluxSingleTransformerBlock")}
    with pytest.raises(BlockLayoutError, match="no argument named 'x'"):
        magsdk.enable(fresh_copy(flux), magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS),
                      strategy=magsdk.MagCacheStrategy(), metadata=wrong)


@pytest.fixture(scope="module")
def pipeline():
    from magsdk.reference.components import build_pipeline

    return build_pipeline(seed=0)


def generate(pipe, steps, seed=0, **kwargs):
    return pipe("a handwritten digit seven", height=32, width=32, num_inference_steps=steps, guidance_scale=1.0,
                max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(seed),
                **kwargs).images


def test_real_pipeline_true_cfg_uses_context_names_and_resamples_per_run(pipeline):
    with magsdk.enable(pipeline, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST)) as handle:
        for steps in (28, 14):
            generate(pipeline, steps, negative_prompt="blurry", true_cfg_scale=2.0)
            assert handle.stats.branches() == ["cond", "uncond"]
            for branch in ("cond", "uncond"):
                assert handle.stats.computed_steps(branch) == handle.plan(steps).computed_steps
        assert handle.stats.generations() == [0, 1]
    assert handle.stats.total_calls == 2 * (28 + 14)


def test_calibrate_through_a_pipeline_averages_seeds(pipeline):
    with magsdk.calibrate(pipeline) as cal:
        for seed in range(3):
            generate(pipeline, 6, seed=seed)
    result = cal.result
    assert result is not None and list(result.branches) == ["cond"]  # FluxPipeline names its context
    assert result.scheduler == "FlowMatchEulerDiscreteScheduler"
    branch = result.branches["cond"]
    assert branch.num_runs == 3 and len(branch.norm_ratios) == 6
    assert max(branch.norm_ratio_spread) > 0  # three different seeds: a real spread


def test_handle_plan_of_a_loop_that_never_says_its_step_count_is_what_it_runs(flux, caplog):
    """A bare transformer given neither ``scheduler=`` nor ``num_inference_steps`` follows the curve as it is,
    one ratio per call (it cannot resample to a count it does not know); ``handle.plan`` says the same, and the
    run says once where it outruns the curve."""
    curve = [1.0, 1.12, 1.05, 1.02, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9]
    config = magsdk.MagCacheConfig(mag_ratios=curve, threshold=0.1, max_skip_steps=3, retention_ratio=0.2)
    model = fresh_copy(flux)
    with magsdk.enable(model, config) as handle:
        denoise(model, 20)
        ran = handle.stats.computed_steps()
        assert ran == handle.plan(20).computed_steps
    said = [r.getMessage() for r in caplog.records if "past the curve's 10 steps" in r.getMessage()]
    assert len(said) == 1 and "call at step 10" in said[0] and "num_inference_steps" in said[0]
    told = fresh_copy(flux)
    with magsdk.enable(told, config.model_copy(update={"num_inference_steps": 20})) as knowing:
        denoise(told, 20)
        assert knowing.stats.computed_steps() == knowing.plan(20).computed_steps  # resampled to 20 steps
    assert ran != knowing.stats.computed_steps()  # the two rules differ on this curve, so the test tells them apart


def test_a_generation_stopped_early_inside_calibrate_does_not_cut_the_curve(pipeline, caplog):
    """A generation that raised (caught by the user) or ran fewer steps is left out of the mean, with a
    warning; before, every run's curve was cut to the shortest one."""

    def stop_at_step_1(pipe, step, timestep, kwargs):
        if step == 1:
            raise RuntimeError("stopped")
        return kwargs

    with magsdk.calibrate(pipeline) as cal:
        with pytest.raises(RuntimeError, match="stopped"):
            generate(pipeline, 6, callback_on_step_end=stop_at_step_1)
        for seed in range(2):
            generate(pipeline, 6, seed=seed)
    result = cal.result
    assert result is not None and result.num_steps == 6
    assert all(len(b.norm_ratios) == 6 and b.num_runs == 2 for b in result.branches.values())
    assert any("recorded fewer steps" in r.getMessage() for r in caplog.records)


def test_a_strategy_named_for_another_transformer_class_is_refused_with_a_fix_that_works(flux):
    """`strategy="wan"` on a Flux transformer used to end in a variant hint whose strategy then found no blocks."""
    model = fresh_copy(flux)
    for named in ("wan", "wan2.1-i2v-480p"):
        with pytest.raises(magsdk.UsageError, match="written for WanTransformer3DModel") as refused:
            magsdk.enable(model, strategy=named)
        assert "leave strategy= out" in str(refused.value)
        assert "forward" not in model.__dict__  # nothing attached
    with magsdk.enable(model) as handle:  # the fix, followed
        assert handle.blocks

    class MyFlux(type(flux)):  # a subclass of the strategy's class is accepted by name
        pass

    sub = fresh_copy(flux)
    sub.__class__ = MyFlux
    with magsdk.enable(sub, strategy="flux") as handle:
        assert handle.blocks


def test_a_second_enable_that_fails_leaves_the_first_one_working(flux):
    model = fresh_copy(flux)
    config = magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST)
    first = magsdk.enable(model, config)
    for bad in ({"strategy": "wan"}, {"strategy": "no_such_strategy"}):
        with pytest.raises(magsdk.MagSDKError):
            magsdk.enable(model, config, **bad)
        assert first.active
    denoise(model, 28)
    assert first.stats.skipped_calls > 0  # still caching
    first.disable()
    assert "forward" not in model.__dict__


def test_wrong_argument_types_are_usage_errors_that_say_what_to_pass(flux):
    model = fresh_copy(flux)
    cases = {"config": {"threshold": 0.1}, "strategy": 3, "metadata": "x"}
    for name, value in cases.items():
        with pytest.raises(magsdk.UsageError, match=f"{name} must be") as refused:
            magsdk.enable(model, **{name: value})
        assert type(value).__name__ in str(refused.value)
        assert "forward" not in model.__dict__
    with pytest.raises(magsdk.UsageError, match=r"MagCacheConfig\(\*\*settings\)"):
        magsdk.enable(model, {"threshold": 0.1})
    config = magsdk.MagCacheConfig(threshold=0.1)
    with pytest.raises(TypeError, match="num_steps must be an int"):
        magsdk.plan(FLUX_RATIOS, config, 2.5)
    with pytest.raises(ValueError, match=r"first_step must be 0 \.\. 10"):
        magsdk.plan(FLUX_RATIOS, config, 10, first_step=-2)
    assert magsdk.plan(FLUX_RATIOS, config, 10, first_step=10).computed_steps == []  # runs none of the steps


def test_a_calibration_replaced_inside_its_block_says_so(pipeline):
    """It used to say "no generation ran", though one did: the session had been replaced."""
    with pytest.raises(magsdk.UsageError, match="ended inside its") as refused:
        with magsdk.calibrate(pipeline):
            generate(pipeline, 4)
            magsdk.enable(pipeline, magsdk.MagCacheConfig(mag_ratios=FLUX_RATIOS, **FAST)).disable()
    assert "Enable the cache after the block" in str(refused.value)
    with magsdk.calibrate(pipeline) as cal:  # the fix, followed: the cache enabled after the block
        generate(pipeline, 4)
    assert cal.result is not None and cal.result.num_steps == 4


def test_cal_result_before_the_block_ends_or_after_it_failed_says_why(pipeline):
    """``cal.result`` used to be None in both cases, which failed later as an AttributeError."""
    with magsdk.calibrate(pipeline) as cal:
        generate(pipeline, 4)
        with pytest.raises(magsdk.UsageError, match=r"ready when the `with magsdk\.calibrate") as early:
            _ = cal.result
        assert "cal.collect()" in str(early.value)
        so_far = cal.collect()  # the hint, followed: the curve of the generation so far
        assert so_far.num_steps == 4
    assert cal.result.num_steps == 4
    assert {n: b.norm_ratios for n, b in cal.result.branches.items()} == {
        n: b.norm_ratios for n, b in so_far.branches.items()}
    with pytest.raises(RuntimeError, match="out of memory"):
        with magsdk.calibrate(pipeline) as failed:
            generate(pipeline, 4)
            raise RuntimeError("out of memory")
    with pytest.raises(magsdk.UsageError, match="ended with RuntimeError: out of memory; so it has no result"):
        _ = failed.result
    with pytest.raises(magsdk.BlockLayoutError, match="recorded nothing"):
        with magsdk.calibrate(pipeline) as empty:
            pass
    with pytest.raises(magsdk.UsageError, match="ended with NoCalibrationError: calibration recorded nothing"):
        _ = empty.result


def test_a_string_target_is_refused_naming_the_function_called():
    for function, name in ((magsdk.enable, "magsdk.enable()"), (magsdk.calibrate, "magsdk.calibrate()")):
        with pytest.raises(magsdk.UsageError, match="from_pretrained") as refused:
            function("org/model")
        assert str(refused.value).startswith(name)


def test_a_branch_served_by_another_branchs_curve_says_so(pipeline):
    """Per-branch curves named pass0/pass1 (a hand loop's calibration) serve a pipeline's cond/uncond by call
    position; the run's record of how each curve was obtained names the curve it took."""
    curves = {"pass0": list(FLUX_RATIOS), "pass1": list(FLUX_RATIOS)}
    config = magsdk.MagCacheConfig(mag_ratios=curves, per_branch_curves=True, **FAST)
    with magsdk.enable(pipeline, config) as handle:
        generate(pipeline, 28, negative_prompt="blurry", true_cfg_scale=2.0)
        how = handle.stats.curves
    assert "of branch 'pass0' (the curves have no 'cond'" in how["transformer:cond"]
    assert "of branch 'pass1' (the curves have no 'uncond'" in how["transformer:uncond"]
    assert magsdk.plan(curves, config, 28, "cond").mapping == how["transformer:cond"]  # plan says the same
