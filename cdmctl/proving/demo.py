"""The demo's before/after: teacher vs student at the inference step count, scored against the ground truth.

The proving-ground plugin (`plugin.py`) calls `write_before_after` at the end of a run whose teacher is a
proving ground's (`builtin:toy-sd3`, `builtin:toy-sd3-coupled`); it writes `before_after.png` (ground-truth samples; the teacher at the student's step
count without and with guidance; the student at that count and at 8 steps; the teacher at 8 steps and
at 50 guided steps) and `before_after.json` (their metrics, with noise floors).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cdmctl.run import DistillRun

REFERENCE_STEPS = 50
PER_PROMPT = 8  # samples of every prompt in each column's scores
MORE_STEPS = 8  # the student is also scored at many steps, where the teacher is good


def is_toy_teacher(pretrained: str) -> bool:
    """Whether `pretrained` names a proving ground's teacher by its built-in name."""
    from cdmctl.proving.grounds import ground_of

    return pretrained.startswith("builtin:") and ground_of(pretrained) is not None


def _line(m: dict[str, float]) -> str:
    return f"prec {m['precision']:.2f} cov {m['coverage']:.2f} mmd2 {m['mmd2']:.3f}"


def reference_guidance(folder: Path, default: float) -> float:
    """The guidance at which the toy teacher samples best (chosen when it was trained; see proving.json)."""
    record = folder / "proving.json"
    return float(json.loads(record.read_text()).get("reference_guidance", default)) if record.is_file() else default


def write_before_after(run: "DistillRun", per_prompt: int | None = None, seed: int = 0) -> Path:
    """Score and picture the run's student (EMA when kept) against its teacher; returns the PNG path."""
    from cdmctl.config.schema import sampling_of
    from cdmctl.proving import evaluate, figure, metrics, teacher
    from cdmctl.proving.grounds import ground_of

    preset = run.preset
    gt = ground_of(preset.model.pretrained).truth()
    per_prompt = per_prompt or PER_PROMPT
    text = teacher.load(Path(run.source))  # the run may have released its own text encoders
    cond, null = text.encode_prompts(gt.prompts), text.encode_prompts([""])
    steps, res = preset.inference.steps, preset.model.resolution
    guidance = reference_guidance(Path(run.source), preset.method.guidance)  # the toy's file sets it
    student = run.accelerator.unwrap_model(run.roles.student_module)
    swap = run.ema.swapped_into(student) if run.ema is not None else contextlib.nullcontext()
    ref, ref_idx = metrics.reference_set(gt)
    idx = torch.arange(gt.num_prompts).repeat_interleave(per_prompt)
    noise = evaluate.paired_noise(len(idx), gt.latent_shape, seed)
    rows = cond.index(idx)

    def run_column(module, n, g, sampling=("euler", "uniform", True), levels=None):
        sampler, rule, time_shift = sampling
        x = evaluate.sample(run.backbone, module, rows, noise, n, res, g, null, sampler=sampler, seed=seed, rule=rule,
                            time_shift=time_shift, levels=levels)  # fmt: skip
        return x, metrics.score(gt, x, idx, ref, ref_idx)

    # TBCM students: sCM's consistency sampler on the TrigFlow levels; inference.time_shift as the preset says
    student_sampler = sampling_of(preset.model_dump(mode="json"))

    tm = run.roles.teacher_module
    columns = {
        f"teacher, {steps} steps": run_column(tm, steps, 1.0),
        f"teacher, {steps} steps, guidance {guidance:g}": run_column(tm, steps, guidance),
    }
    with swap:
        columns[f"student, {steps} steps"] = run_column(student, steps, 1.0, student_sampler, preset.inference.levels)
        # a student must not get worse with more steps: the 8-step column shows it (and the guard checks it)
        columns[f"student, {MORE_STEPS} steps"] = run_column(student, MORE_STEPS, 1.0, student_sampler)
    columns[f"teacher, {MORE_STEPS} steps"] = run_column(tm, MORE_STEPS, 1.0)
    columns[f"teacher, {REFERENCE_STEPS} steps, guidance {guidance:g}"] = run_column(tm, REFERENCE_STEPS, guidance)
    floor = metrics.noise_floor(gt, per_prompt)
    shown = [c * len(gt.spec.shapes) + c % len(gt.spec.shapes) for c in range(len(gt.spec.colors))]
    show = min(4, per_prompt)
    truth = gt.sample(torch.tensor(shown).repeat_interleave(show), torch.Generator().manual_seed(seed))
    pictures = [("ground-truth samples", [_line({k: v[0] for k, v in floor.items()}) + " (floor)"],
                 truth.view(len(shown), show, *truth.shape[1:]))]  # fmt: skip
    for name, (x, m) in columns.items():
        pictures.append((name, [_line(m)], x.view(gt.num_prompts, per_prompt, *x.shape[1:])[shown, :show]))
    title = (f"{preset.name}: {run.distiller.counters.iteration} iterations of {preset.method.name}; "
             f"{per_prompt} samples per prompt, {gt.num_prompts} prompts; precision within {metrics.default_tau(gt):.3f} RMS")  # fmt: skip
    png = figure.compose(pictures, [gt.prompts[i] for i in shown], title, run.folder / "before_after.png")
    record = {
        "iterations": run.distiller.counters.iteration,
        "per_prompt": per_prompt,
        "noise_floor": {k: {"mean": v[0], "std": v[1]} for k, v in floor.items()},
        "columns": {name: m for name, (_, m) in columns.items()},
    }
    (run.folder / "before_after.json").write_text(json.dumps(record, indent=2) + "\n")
    return png
