"""Presets: every shipped one validates, overrides are validated like the file, `presets` commands render."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from cdmctl import cli
from cdmctl.config import builtin_presets, load_preset
from cdmctl.config.load import apply_override
from cdmctl.errors import UserError

SHIPPED = sorted(builtin_presets())


def test_all_expected_presets_ship():
    assert {"demo", "sd3-4nfe", "sd3-cdm-fixed", "sd3-ddmd", "sd3-dmd2"} <= set(SHIPPED)
    assert {"longcat-4nfe", "longcat-cdm-fixed", "longcat-ddmd", "longcat-dmd2", "sd35m-4nfe", "sd35l-4nfe"} <= set(SHIPPED)
    assert {"flux2-klein-4nfe", "qwenimage-4nfe", "zimage-4nfe", "zimage-ddmd"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_validates(name):
    preset = load_preset(name)
    assert preset.name == name
    assert preset.description


def test_paper_recipe_defaults():
    p = load_preset("sd3-4nfe")
    assert p.model.pretrained == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert p.model.resolution == 1024 and p.model.precision == "bf16" and p.model.gradient_checkpointing
    m = p.method
    assert (m.name, m.schedule.kind, m.schedule.length) == ("cdm", "dynamic", (1, 28))
    # the levels are ours, not the paper's [0.25, 0.95] through the shift (test_dynamic_presets_train_at_8_step_levels)
    assert (m.schedule.level_range, m.schedule.inner, m.schedule.coverage) == ((0.05, 0.98), "stratified", 1.0)
    assert (m.losses.ca, m.losses.dm, m.losses.cdm, m.guidance, m.ttur_ratio, m.merge_decay) == (1, 1, 1, 7.0, 2, 0.999)
    assert (m.cdm_perturbation, m.cdm_target, m.level_clamp) == ("velocity", "local", (0.02, 0.98))
    o = p.optim
    assert (o.student_lr, o.fake_lr, o.weight_decay, o.warmup_steps, o.grad_clip) == (1e-5, 5e-6, 1e-4, 100, 1.0)
    assert (p.train.batch_size, p.train.iterations) == (128, 4000)
    assert p.inference.schedule() == [1.0, 0.75, 0.5, 0.25]


def test_longcat_recipe():
    """The paper's LongCat recipe (LoRA 64/128, batch 64) with the CDM reference config's numbers (preset header)."""
    p = load_preset("longcat-4nfe")
    assert (p.model.backbone, p.model.pretrained, p.model.resolution) == ("longcat", "meituan-longcat/LongCat-Image", 1024)
    assert p.model.train == "lora" and (p.model.lora.rank, p.model.lora.alpha, p.model.lora.targets) == (64, 128.0, None)
    assert p.model.text_length is None and p.model.precision == "bf16" and p.model.gradient_checkpointing
    m, o = p.method, p.optim
    assert (m.name, m.guidance, m.ttur_ratio, m.merge_decay, m.level_clamp) == ("cdm", 7.0, 2, 0.999, (0.02, 0.98))
    assert (m.schedule.level_range, m.schedule.inner, m.schedule.coverage) == ((0.05, 0.98), "stratified", 1.0)
    assert (o.student_lr, o.fake_lr, o.weight_decay, o.warmup_steps, o.ema) == (1e-5, 5e-6, 1e-4, 100, True)
    assert (p.train.batch_size, p.train.iterations) == (64, 2000)
    for name in ("longcat-cdm-fixed", "longcat-ddmd", "longcat-dmd2"):  # the same recipe, other losses
        other = load_preset(name)
        assert (other.model, other.optim, other.train) == (p.model, p.optim, p.train), name


@pytest.mark.parametrize("name, model_id, guidance", [("sd35m-4nfe", "stabilityai/stable-diffusion-3.5-medium", 4.5),
                                                      ("sd35l-4nfe", "stabilityai/stable-diffusion-3.5-large", 3.5)])
def test_sd35_presets_use_the_sd3_adapter_with_the_sd3_medium_recipe(name, model_id, guidance):
    p, sd3 = load_preset(name), load_preset("sd3-4nfe")
    assert (p.model.backbone, p.model.pretrained, p.model.resolution, p.method.guidance) == ("sd3", model_id, 1024, guidance)
    assert (p.optim, p.train, p.method.schedule) == (sd3.optim, sd3.train, sd3.method.schedule)


@pytest.mark.parametrize(
    "name, method, kind, losses",
    [
        ("sd3-cdm-fixed", "cdm-fixed", "fixed", (1, 1, 1, 0)),
        ("sd3-ddmd", "ddmd", "fixed", (1, 1, 0, 0)),
        ("sd3-dmd2", "dmd2", "fixed", (0, 0, 0, 1)),
        ("longcat-cdm-fixed", "cdm-fixed", "fixed", (1, 1, 1, 0)),
        ("longcat-ddmd", "ddmd", "fixed", (1, 1, 0, 0)),
        ("longcat-dmd2", "dmd2", "fixed", (0, 0, 0, 1)),
    ],
)
def test_baseline_presets(name, method, kind, losses):
    m = load_preset(name).method
    assert (m.name, m.schedule.kind) == (method, kind)
    assert (m.losses.ca, m.losses.dm, m.losses.cdm, m.losses.guided_dm) == losses
    assert m.schedule.levels == [1.0, 0.75, 0.5, 0.25]


def test_overrides_are_parsed_as_yaml_and_validated():
    p = load_preset("sd3-4nfe", ["optim.student_lr=2e-5", "method.schedule.inner=stratified",
                                 "method.schedule.length=[2, 8]", "optim.ema=false"])
    assert p.optim.student_lr == 2e-5 and p.method.schedule.inner == "stratified"
    assert p.method.schedule.length == (2, 8) and p.optim.ema is False
    with pytest.raises(UserError, match="method.schedule.inner"):
        load_preset("sd3-4nfe", ["method.schedule.inner=sorted"])
    with pytest.raises(UserError, match="level_range"):
        load_preset("sd3-4nfe", ["method.schedule.level_range=[0.9, 0.2]"])
    with pytest.raises(UserError, match="method dmd2 uses only the guided DM loss"):
        load_preset("sd3-dmd2", ["method.losses.ca=1"])
    with pytest.raises(UserError, match="at least one loss weight"):
        load_preset("sd3-ddmd", ["method.losses.ca=0", "method.losses.dm=0"])


def test_override_syntax_errors():
    with pytest.raises(UserError, match="bad override"):
        apply_override({}, "optim.student_lr")
    with pytest.raises(UserError, match="not a section"):
        apply_override({"optim": 3}, "optim.student_lr=1")


def test_user_preset_file_with_relative_prompts(tmp_path):
    (tmp_path / "my_prompts.txt").write_text("a cat\n")
    path = tmp_path / "mine.yaml"
    path.write_text("model: {pretrained: some/model}\ndata: {prompts: my_prompts.txt}\n")
    p = load_preset(str(path))
    assert p.name == "mine" and p.data.prompts == str(tmp_path / "my_prompts.txt")
    assert p.method.name == "cdm"  # unspecified sections take docs/method.md's defaults
    with pytest.raises(UserError, match="preset file not found"):
        load_preset(str(tmp_path / "missing.yaml"))


def test_presets_list_and_show_render(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cdmctl"])
    runner = CliRunner()
    listed = runner.invoke(cli.app, ["presets", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    for name in SHIPPED:
        assert name in listed.output
    shown = runner.invoke(cli.app, ["presets", "show", "sd3-4nfe", "--set", "method.guidance=5"],
                          env={"COLUMNS": "250"})
    assert shown.exit_code == 0
    assert "guidance: 5.0  # Teacher guidance scale g used by CA and guided DM." in shown.output
    assert "level_clamp: [0.02, 0.98]  # [s_min, s_max]" in shown.output


def static_shift(k: float):
    return lambda s, steps=None: k * s / (1 + (k - 1) * s)


def longcat_shift(resolution: int):
    """The LongCat adapter's own shift at `resolution` px: the tiny pipeline's scheduler config, which holds the
    dynamic-shift values LongCatImagePipeline falls back to (mu from the packed sequence length)."""
    from cdmctl.backbones.flow import scheduler_shift
    from cdmctl.backbones.longcat import image_mu
    from cdmctl.backbones.tiny.longcat import tiny_longcat_scheduler

    scheduler = tiny_longcat_scheduler()
    mu = image_mu(scheduler.config, 8, resolution, resolution)
    return lambda s, steps=None: scheduler_shift(scheduler, s, mu, "tiny")


def flux2_klein_shift(resolution: int):
    """FLUX.2 [klein]'s shift: the pipeline's empirical mu of the token count and the step count (dynamic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cdmctl.backbones.flow import scheduler_shift
    from cdmctl.backbones.flux2_klein import image_mu

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    return lambda s, steps: scheduler_shift(scheduler, s, image_mu(8, resolution, resolution, steps), "tiny")


def qwenimage_shift(resolution: int):
    """Qwen-Image's shift as the adapter applies it: the published scheduler config's dynamic shift (mu from the
    packed token count), its terminal stretch dropped."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cdmctl.backbones.flow import scheduler_shift
    from cdmctl.backbones.qwenimage import image_mu, without_terminal_stretch
    from cdmctl.backbones.tiny.qwenimage import SCHEDULER_CONFIG

    scheduler = without_terminal_stretch(FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
    mu = image_mu(scheduler.config, 8, resolution, resolution)
    return lambda s, steps=None: scheduler_shift(scheduler, s, mu, "tiny")


# the time shift each shipped preset's teacher samples with at its resolution (SD3-Medium's and SD3.5's scheduler:
# 3; the proving ground's toy: 6; LongCat-Image: the dynamic shift at 1024 px, mu = 1.15)
# the time shift each preset trains and samples through (demo: none, its schedule and sampling are unshifted)
PRESET_SHIFT = {"demo": lambda: static_shift(1.0), "sd3-4nfe": lambda: static_shift(3.0),
                "sd35m-4nfe": lambda: static_shift(3.0), "sd35l-4nfe": lambda: static_shift(3.0),
                "longcat-4nfe": lambda: longcat_shift(1024), "flux2-klein-4nfe": lambda: flux2_klein_shift(1024),
                "zimage-4nfe": lambda: static_shift(3.0), "qwenimage-4nfe": lambda: qwenimage_shift(1024)}  # fmt: skip


def test_flux2_klein_recipe():
    """The pipeline's numbers (1024 px, guidance 4) with the paper's SD3 method recipe (preset header)."""
    p = load_preset("flux2-klein-4nfe")
    assert (p.model.backbone, p.model.pretrained, p.model.resolution) == (
        "flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B", 1024)
    assert p.model.train == "full" and p.model.text_length is None and p.method.guidance == 4.0
    sd3 = load_preset("sd3-4nfe")
    assert (p.method.schedule, p.optim, p.train) == (sd3.method.schedule, sd3.optim, sd3.train)


def test_qwenimage_recipe():
    """LoRA by default (20B transformer) with longcat-4nfe's recipe, the pipeline's numbers (1024 px, true CFG 4)."""
    p, longcat = load_preset("qwenimage-4nfe"), load_preset("longcat-4nfe")
    assert (p.model.backbone, p.model.pretrained, p.model.resolution) == ("qwenimage", "Qwen/Qwen-Image", 1024)
    assert p.model.train == "lora" and p.model.lora == longcat.model.lora and p.method.guidance == 4.0
    assert (p.method.schedule, p.optim, p.train) == (longcat.method.schedule, longcat.optim, longcat.train)


def test_zimage_recipe():
    """The pipeline's numbers (1024 px, its guidance 5 = standard 6) with the paper's SD3 method recipe; zimage-ddmd
    is the same recipe with Decoupled DMD's losses and schedule (how Z-Image-Turbo was made)."""
    from cdmctl.backbones.zimage import ZImageBackbone

    p = load_preset("zimage-4nfe")
    assert (p.model.backbone, p.model.pretrained, p.model.resolution) == ("zimage", "Tongyi-MAI/Z-Image", 1024)
    assert p.model.train == "full" and p.method.guidance == 6.0
    assert ZImageBackbone.guidance_kwargs(p.method.guidance) == {"guidance_scale": 5.0}  # the pipeline's default
    sd3 = load_preset("sd3-4nfe")
    assert (p.method.schedule, p.optim, p.train) == (sd3.method.schedule, sd3.optim, sd3.train)
    ddmd, sd3_ddmd = load_preset("zimage-ddmd"), load_preset("sd3-ddmd")
    assert (ddmd.model, ddmd.optim, ddmd.train, ddmd.method.guidance) == (p.model, p.optim, p.train, 6.0)
    assert (ddmd.method.name, ddmd.method.losses, ddmd.method.schedule) == (
        "ddmd", sd3_ddmd.method.losses, sd3_ddmd.method.schedule)


@pytest.mark.parametrize("name", sorted(PRESET_SHIFT))
def test_dynamic_presets_train_at_the_levels_1_to_8_step_inference_visits(name):
    """Every level that 1-8 step inference visits (after the shift, where the preset samples through it) has
    training levels near it, the lowest too."""
    import torch

    from cdmctl.config.schema import sampling_of
    from cdmctl.engine.rng import generator
    from cdmctl.engine.schedules import sample_dynamic_schedule

    preset = load_preset(name)
    sched, shift = preset.method.schedule, PRESET_SHIFT[name]()
    # schedule and sampling agree on the shift (demo: both without it, the toy's shift of 6 unused)
    assert sched.kind == "dynamic" and sched.time_shift == (name != "demo") == sampling_of(preset.model_dump())[2]
    if name == "longcat-4nfe":
        assert preset.model.resolution == 1024
        assert float(shift(torch.tensor(0.5))) == pytest.approx(3.1582 / 4.1582, abs=1e-4)  # about shift e^1.15

    levels = torch.cat([
        sample_dynamic_schedule(generator(0, i, "length"), sched.length, sched.level_range, sched.inner,
                                inner_gen=generator(0, i, "levels"), shift=shift, coverage=sched.coverage,
                                coverage_gen=generator(0, i, "coverage"))[1:]
        for i in range(400)
    ])
    visited = {round(float(shift(torch.tensor(j / n, dtype=torch.float64), n)), 3) for n in range(2, 9) for j in range(1, n)}
    for level in sorted(visited):
        near = float(((levels - level).abs() < 0.05).double().mean())
        assert near > 0.03, f"{name}: only {near:.1%} of training levels within 0.05 of inference level {level}"
