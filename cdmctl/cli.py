"""The `cdmctl` command line: parse, load and validate a preset, call one function, render with rich."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cdmctl.errors import UserError

app = typer.Typer(
    help="Distil flow-matching text-to-image models into 1-8 step students with Continuous-Time Distribution "
    "Matching, then export, sample and score them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
presets_app = typer.Typer(help="List and inspect the built-in presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
console = Console()
err_console = Console(stderr=True)


@app.command()
def distill(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Built-in preset name or a path to a YAML file.")],
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a field: --set optim.student_lr=2e-5 (repeatable).")
    ] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (default: the preset's run.output_dir).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the folder from its newest intact checkpoint.")] = False,
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="With --resume: 'latest' (newest intact) or an iteration number.")
    ] = "latest",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved preset; train nothing.")] = False,
    live: Annotated[Optional[bool], typer.Option("--live/--plain", help="Live dashboard or plain log lines.")] = None,
) -> None:
    """Distil a student as the preset says (single process, or under `accelerate launch`)."""
    from cdmctl.config import load_preset

    resolved = load_preset(preset, set_ or [])
    if dry_run:
        _print_yaml(resolved.model_dump(mode="json"))
        return
    from cdmctl.run import distill as run_distill

    result = run_distill(resolved, out=out, resume=resume, live=live, checkpoint=checkpoint)
    if not result.main_process:
        return
    console.print(f"[bold green]done[/] {result.iterations} iterations")
    for label, path in (("run folder", result.folder), ("checkpoint", result.checkpoint),
                        ("metrics", result.metrics), ("samples", result.samples)):
        console.print(f"  {label:<11} {path}", soft_wrap=True, highlight=False, markup=False)


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="Run folder written by `cdmctl distill`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the diffusers pipeline to.")],
    checkpoint: Annotated[str, typer.Option(help="'latest' or an iteration number.")] = "latest",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Export the EMA weights (default) or the raw student.")] = True,
    dtype: Annotated[str, typer.Option(help="Weight dtype of every component: bf16, fp16 or fp32.")] = "fp32",
    lora_only: Annotated[
        bool, typer.Option("--lora-only", help="LoRA runs: write just the adapter (diffusers LoRA format).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Export a run's checkpoint as a self-contained diffusers pipeline folder (plus cdmctl.json)."""
    from cdmctl.export import export_run

    folder = export_run(run_dir, out, checkpoint=checkpoint, ema=ema, dtype=dtype, lora_only=lora_only,
                        overwrite=overwrite)  # fmt: skip
    console.print(f"[bold green]exported[/] {escape(str(folder))}", soft_wrap=True, highlight=False)
    console.print(f"  load with: DiffusionPipeline.from_pretrained({str(folder)!r})", soft_wrap=True,
                  highlight=False, markup=False)  # fmt: skip


@app.command()
def generate(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="One or more prompts.", show_default=False)] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompt file (.txt or .jsonl) or builtin:NAME.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Exported folder, run folder, or hub id.")] = ...,
    checkpoint: Annotated[str, typer.Option(help="Run folders: 'latest' or an iteration number.")] = "latest",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Run folders: EMA weights (default) or the raw student.")] = True,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: cdmctl.json's, else 4).")] = None,
    sigmas: Annotated[
        Optional[str], typer.Option(help="Unshifted schedule overriding --steps, e.g. 1,0.75,0.5,0.25.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image k gets seed + k.")] = 0,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call (does not change the images).")] = 4,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the training resolution).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the training resolution).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu, ... (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU).")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs and the grid.")] = "samples",
    compare_teacher: Annotated[
        bool, typer.Option("--compare-teacher", help="Also sample the base model; write a side-by-side sheet.")
    ] = False,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher model (default: the student's base model).")] = None,
    teacher_steps: Annotated[int, typer.Option(help="Teacher sampling steps.")] = 28,
    teacher_guidance: Annotated[float, typer.Option(help="Teacher guidance scale.")] = 7.0,
) -> None:
    """Sample a few-step student: PNGs with their settings in the metadata, plus a contact sheet."""
    from cdmctl.generate import generate as run_generate
    from cdmctl.generate import parse_sigmas
    from cdmctl.prompts import load_prompts

    texts = list(prompt or []) + (load_prompts(prompts) if prompts else [])
    result = run_generate(
        texts, model=model, out=out, checkpoint=checkpoint, ema=ema, steps=steps, sigmas=parse_sigmas(sigmas),
        seed=seed, num_images=num_images, batch_size=batch_size, height=height, width=width, device=device,
        dtype=dtype, compare_teacher=compare_teacher, teacher=teacher, teacher_steps=teacher_steps,
        teacher_guidance=teacher_guidance,
    )  # fmt: skip
    console.print(f"[bold green]wrote[/] {len(result.images)} images to {escape(str(out))}", soft_wrap=True,
                  highlight=False)  # fmt: skip
    for label, path in (("grid", result.grid), ("compare", result.compare)):
        if path is not None:
            console.print(f"  {label:<8} {path}", soft_wrap=True, highlight=False, markup=False)


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_(
    ctx: typer.Context,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Student to evaluate: exported folder, run folder or hub id. Repeat to compare several.")] = None,
    metrics: Annotated[Optional[list[str]], typer.Option("--metrics", help="Metrics: pickscore clipscore hpsv2 aesthetic fid hpsv3 imagereward ocr dpg (space- or comma-separated).")] = None,
    prompts: Annotated[str, typer.Option(help="Prompt set (pickscore-test, dpg-bench, ocr, coco-2014-10k) or a .txt/.jsonl file.")] = "pickscore-test",
    out: Annotated[Optional[str], typer.Option(help="Result folder (default evals/<model name>; several models: one folder each under it).")] = None,
    phase: Annotated[str, typer.Option(help="generate, score or all. Each phase resumes where it stopped.")] = "all",
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: the student's own).")] = None,
    sigmas: Annotated[Optional[str], typer.Option(help="Unshifted schedule, e.g. 1,0.75,0.5,0.25 (instead of --steps).")] = None,
    seed: Annotated[int, typer.Option(help="Base seed: image j of prompt i uses seed + i * num-per-prompt + j.")] = 0,
    num_per_prompt: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts.")] = None,
    batch_size: Annotated[int, typer.Option(help="Generation batch size (images do not depend on it).")] = 4,
    score_batch_size: Annotated[int, typer.Option(help="Scoring batch size.")] = 8,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the student's resolution).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the student's resolution).")] = None,
    checkpoint: Annotated[str, typer.Option(help="For a run folder: checkpoint step or 'latest'.")] = "latest",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="For a run folder: sample the EMA weights.")] = True,
    device: Annotated[Optional[str], typer.Option(help="Device (default: this rank's GPU, else cpu).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Student dtype (default bf16 on GPU, fp32 on CPU).")] = None,
    metric_option: Annotated[Optional[list[str]], typer.Option("--metric-option", "-o", help="METRIC.OPTION=VALUE, e.g. fid.reference=coco-2014-10k (repeatable).")] = None,
    rescore: Annotated[bool, typer.Option("--rescore", help="Discard stored scores of these metrics and score again.")] = False,
    compare: Annotated[Optional[list[str]], typer.Option("--compare", help="Only print one table over these result folders.")] = None,
) -> None:
    """Generate images for a prompt set and score them (PickScore, HPS, FID, ...); or compare result folders."""
    from cdmctl import evaluate as ev
    from cdmctl.generate import parse_sigmas

    extra = list(ctx.args)  # `--metrics a b` / `--compare A B`: click passes the values after the first as extras
    if compare:
        console.print(ev.render_table(ev.compare([*compare, *extra]), title="comparison"))
        return
    if any(a.startswith("-") for a in extra):
        raise UserError(f"unknown option {next(a for a in extra if a.startswith('-'))}", "see `cdmctl eval --help`")
    names = [n for item in [*(metrics or []), *extra] for n in item.replace(",", " ").split()]
    models = model or ([out] if phase == "score" and out else [])
    if not models:
        raise UserError("no --model given", "pass --model FOLDER (repeat it to compare), or --out FOLDER with --phase score")
    rows = ev.run_eval(
        models, prompts, names, out or ev.default_out(models), phase=phase,
        metric_options=ev.parse_metric_options(metric_option or []), limit=limit, steps=steps,
        sigmas=parse_sigmas(sigmas), seed=seed, num_per_prompt=num_per_prompt, batch_size=batch_size,
        score_batch_size=score_batch_size, height=height, width=width, checkpoint=checkpoint, ema=ema,
        device=device, dtype=dtype, rescore=rescore,
    )  # fmt: skip
    if rows:
        console.print(ev.render_table(rows))
        for row in rows:
            console.print(f"  {row['label']}: {row['folder']}/summary.md", highlight=False, markup=False)


@presets_app.command("list")
def presets_list() -> None:
    """Name and one-line description of every built-in preset."""
    from rich.table import Table

    from cdmctl.config import builtin_presets, load_preset

    table = Table("preset", "method", "model", "description")
    for name in sorted(builtin_presets()):
        p = load_preset(name)
        table.add_row(name, p.method.name, p.model.pretrained, p.description)
    console.print(table)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name or path.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a field (as for distill).")] = None,
    docs: Annotated[bool, typer.Option("--docs/--no-docs", help="Show each field's meaning.")] = True,
) -> None:
    """The fully resolved preset, each field with its meaning."""
    from cdmctl.config import load_preset
    from cdmctl.config.describe import describe_preset

    resolved = load_preset(name, set_ or [])
    if docs:
        console.print(describe_preset(resolved), highlight=False, soft_wrap=True, markup=False)
    else:
        _print_yaml(resolved.model_dump(mode="json"))


def _print_yaml(data: dict) -> None:
    import yaml

    console.print(yaml.safe_dump(data, sort_keys=False), highlight=False, markup=False, soft_wrap=True, end="")


def main() -> None:
    """Entry point: user errors print one line with the fix and exit 2; training failures exit 1."""
    if len(sys.argv) > 1 and sys.argv[1] in {"distill", "export", "generate", "eval"}:
        from cdmctl.quiet import quiet_libraries

        quiet_libraries()
    try:
        app(standalone_mode=False)
    except UserError as exc:
        fix = f"\n  fix: {escape(exc.fix)}" if exc.fix else ""
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}{fix}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except Exception as exc:  # click's own usage errors keep their usual exit code 2
        import click

        from cdmctl.engine.loop import TrainingDiverged

        if isinstance(exc, TrainingDiverged):
            err_console.print(f"[bold red]training stopped:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(1)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
