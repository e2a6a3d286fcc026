"""The `cdmctl` command line: parse, load and validate a preset, call one function, render with rich."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from cdmctl.errors import UserError

def examples(*lines: str) -> str:
    """The end of a command's --help: a few complete command lines (rich joins single newlines: one paragraph
    each; no square brackets, which rich would take for markup)."""
    return "Examples:\n\n" + "\n\n".join(lines)


app = typer.Typer(
    epilog=examples(
        "cdmctl distill --preset demo    # distil the toy teacher on CPU, nothing downloaded",
        "cdmctl export runs/demo --out students/demo",
        'cdmctl generate "a red cat" "a blue bird" --model students/demo',
    ),
    help="Distil flow-matching text-to-image models into 1-8 step students with Continuous-Time Distribution "
    "Matching, then export, sample and score them.",
    pretty_exceptions_enable=False,
    add_completion=False,
)
presets_app = typer.Typer(help="List and inspect the built-in presets.",
                          epilog=examples("cdmctl presets list", "cdmctl presets show sd3-4nfe"))
app.add_typer(presets_app, name="presets")
console = Console()
err_console = Console(stderr=True)
EXIT_USAGE = 2  # a usage error or a UserError (click's code for usage errors)
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports a killed job
SCHEDULER_HELP = ("Training-free sampler, a diffusers scheduler by name: euler, dpmpp-2m (DPM-Solver++ 2M), unipc, "
                  "x0-renoise (x0 + fresh noise at TrigFlow levels); docs/baselines.md.")
SHIFT_HELP = "Static time shift of the sampling levels (1 = none; default: the model's own)."


# Not typer's no_args_is_help: what that does differs between typer/click versions (help on stdout and exit 0
# before click 8.2, a NoArgsIsHelpError since). Here it is always the help and exit 2, click 8.2's convention:
# a bare group names no command, so scripts must not take it for success.
@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", is_eager=True, help="Print cdmctl's version and exit.")] = False,
) -> None:
    if version:
        from cdmctl import __version__

        typer.echo(f"cdmctl {__version__}")
        raise typer.Exit(0)
    _help_when_bare(ctx)


@presets_app.callback(invoke_without_command=True)
def _presets(ctx: typer.Context) -> None:
    _help_when_bare(ctx)


def _help_when_bare(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None and not ctx.resilient_parsing:
        text = ctx.get_help()  # typer with rich prints the help itself and returns ""
        if text:
            typer.echo(text)
        raise typer.Exit(EXIT_USAGE)


@app.command(epilog=examples(
    "cdmctl distill --preset demo    # the toy teacher on CPU, a few minutes",
    "cdmctl distill --preset sd3-4nfe --set model.pretrained=my/model --set data.prompts=prompts.txt",
    "cdmctl distill --preset my.yaml --out runs/mine --resume    # continue from the newest intact checkpoint",
))
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
    trackers: Annotated[
        Optional[str], typer.Option("--trackers", help="Also log to these trackers, e.g. tensorboard,wandb (sets run.trackers).")
    ] = None,
) -> None:
    """Distil a student as the preset says (single process, or under `accelerate launch`)."""
    from cdmctl.config import load_preset

    resolved = load_preset(preset, set_ or [])
    if trackers is not None:
        resolved.run.trackers = [t for t in trackers.replace(",", " ").split() if t]
    if dry_run:
        _print_yaml(resolved.model_dump(mode="json"))
        return
    from cdmctl.runfolder import opened_run, run_folder

    # every refusal the command and preset allow comes here, before torch, diffusers or the model load
    with opened_run(resolved, run_folder(resolved, out), resume, checkpoint) as start:
        from cdmctl.run import RunInterrupted, train_opened

        with sigterm_outlived_while_reporting() as reporting:
            try:
                result = train_opened(resolved, start, live)
            except RunInterrupted as stop:
                if stop.main_process:
                    err_console.print(interrupted_line(stop, preset, set_ or []), soft_wrap=True, highlight=False,
                                      markup=False)  # fmt: skip
                raise typer.Exit(EXIT_SIGNAL.get(stop.signal_name, 130)) from None
            except Exception as exc:
                reporting.append(True)
                line = rank_failure_line(exc, start.folder, preset, set_ or [])
                if line is None:
                    raise
                err_console.print(line, soft_wrap=True, highlight=False, markup=False)
                raise typer.Exit(1) from None
    if not result.main_process:
        return
    console.print(f"[bold green]done[/] {result.iterations} iterations")
    for label, path in (("run folder", result.folder), ("checkpoint", result.checkpoint),
                        ("metrics", result.metrics), ("samples", result.samples)):
        if path is not None:  # a resume with nothing left to do drew no samples
            console.print(f"  {label:<11} {path}", soft_wrap=True, highlight=False, markup=False)


@app.command(epilog=examples(
    "cdmctl export runs/sd3-4nfe --out students/sd3-turbo",
    "cdmctl export runs/sd3-4nfe -o students/sd3-turbo-bf16 --dtype bf16 --checkpoint 2000 --no-ema",
    "cdmctl export runs/longcat-4nfe --out students/longcat-lora --lora-only",
))
def export(
    run_dir: Annotated[str, typer.Argument(help="Run folder written by `cdmctl distill`.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write the diffusers pipeline to.")],
    checkpoint: Annotated[str, typer.Option(help="'latest', 'best' (the best evaluated) or an iteration number.")] = "latest",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Export the EMA weights (default) or the raw student.")] = True,
    dtype: Annotated[str, typer.Option(help="Weight dtype of every component: bf16, fp16 or fp32.")] = "fp32",
    lora_only: Annotated[
        bool, typer.Option("--lora-only", help="LoRA runs: write just the adapter (diffusers LoRA format).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Export a run's checkpoint as a self-contained diffusers pipeline folder (plus cdmctl.json)."""
    from cdmctl.export import export_run

    _quiet_libraries()
    folder = export_run(run_dir, out, checkpoint=checkpoint, ema=ema, dtype=dtype, lora_only=lora_only,
                        overwrite=overwrite)  # fmt: skip
    console.print(f"[bold green]exported[/] {escape(str(folder))}", soft_wrap=True, highlight=False)
    console.print(f"  load with: DiffusionPipeline.from_pretrained({str(folder)!r})", soft_wrap=True,
                  highlight=False, markup=False)  # fmt: skip
    for line in _unused_parts_note(folder):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def _unused_parts_note(folder) -> list[str]:
    """Parts of the exported family that cdmctl does not load (LongCat: text_processor), and how to skip them."""
    from cdmctl.backbones import adapter_class
    from cdmctl.export import read_info

    family = read_info(folder).get("backbone")
    parts = adapter_class(family).unused_parts if family else ()
    if not parts:
        return []
    skip = ", ".join(f"{p}=None" for p in parts)
    return [f"  {', '.join(parts)} (copied from the base, unused by cdmctl) may need extra packages; pass {skip} to "
            "leave it out"]


@app.command(epilog=examples(
    'cdmctl generate "a cat saying hello" --model students/sd3-turbo -n 4',
    "cdmctl generate --prompts prompts.txt --model runs/sd3-4nfe --checkpoint latest --steps 2",
    'cdmctl generate "a lighthouse" --model students/sd3-turbo --sigmas 1,0.8,0.5,0.2 --compare-teacher',
))
def generate(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="One or more prompts.", show_default=False)] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompt file (.txt or .jsonl) or builtin:NAME.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Exported folder, run folder, or hub id.")] = ...,
    checkpoint: Annotated[str, typer.Option(help="Run folders: 'latest', 'best' or an iteration number.")] = "latest",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Run folders: EMA weights (default) or the raw student.")] = True,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: cdmctl.json's, else 4).")] = None,
    sigmas: Annotated[
        Optional[str], typer.Option(help="Unshifted schedule overriding --steps, e.g. 1,0.75,0.5,0.25.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image k gets seed + k.")] = 0,
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1, help="Images per prompt.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per pipeline call (does not change the images).")] = 4,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the training resolution).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the training resolution).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda, cuda:1, cpu, ... (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU).")] = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs and the grid.")] = "samples",
    compare_teacher: Annotated[
        bool, typer.Option("--compare-teacher", help="Also sample the base model; write a side-by-side sheet.")
    ] = False,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher model (default: the student's base model).")] = None,
    teacher_steps: Annotated[
        Optional[int], typer.Option(help="Teacher sampling steps (default: its pipeline's own, SD3 28).")
    ] = None,
    teacher_guidance: Annotated[
        Optional[float], typer.Option(help="Teacher guidance scale (default: its pipeline's own, SD3 7).")
    ] = None,
    scheduler: Annotated[Optional[str], typer.Option(help=SCHEDULER_HELP + " With --compare-teacher: the teacher's "
                                                     "sampler (default: its pipeline's own).")] = None,
    shift: Annotated[Optional[float], typer.Option(help=SHIFT_HELP + " With --compare-teacher: the teacher's.")] = None,
) -> None:
    """Sample a few-step student: PNGs with their settings in the metadata, plus a contact sheet."""
    from cdmctl.outputs import check_not_file
    from cdmctl.prompts import load_prompts
    from cdmctl.samplers import check_sampler, check_shift

    check_not_file(out)
    check_sampler(scheduler), check_shift(shift)
    if (scheduler is not None or shift is not None) and not compare_teacher:
        raise UserError("--scheduler and --shift choose the teacher's sampler", "add --compare-teacher")
    texts = list(prompt or []) + (load_prompts(prompts) if prompts else [])  # refused before torch loads

    from cdmctl.generate import check_device, check_steps, expand, parse_sigmas
    from cdmctl.generate import generate as run_generate

    expand(texts, seed, num_images)  # no prompts, bad --num-images: refused before any library loads
    levels, steps, device = parse_sigmas(sigmas), check_steps(steps), check_device(device)
    _quiet_libraries()
    with interrupt_line("the images are written together at the end; run the same command again (every image has "
                        "its own seed, so they come out the same)"):  # fmt: skip
        result = run_generate(
            texts, model=model, out=out, checkpoint=checkpoint, ema=ema, steps=steps, sigmas=levels,
            seed=seed, num_images=num_images, batch_size=batch_size, height=height, width=width, device=device,
            dtype=dtype, compare_teacher=compare_teacher, teacher=teacher, teacher_steps=teacher_steps,
            teacher_guidance=teacher_guidance, teacher_scheduler=scheduler, teacher_shift=shift,
        )  # fmt: skip
    console.print(f"[bold green]wrote[/] {len(result.images)} images to {escape(str(out))}", soft_wrap=True,
                  highlight=False)  # fmt: skip
    for label, path in (("grid", result.grid), ("compare", result.compare)):
        if path is not None:
            console.print(f"  {label:<8} {path}", soft_wrap=True, highlight=False, markup=False)


@app.command("eval", context_settings={"allow_extra_args": True}, epilog=examples(
    "cdmctl eval --model students/sd3-turbo --metrics pickscore hpsv2 --prompts pickscore-test -o evals/sd3-turbo",
    "cdmctl eval --model students/a --model students/b --metrics fid --metric-option fid.reference=coco-2014-10k",
    "cdmctl eval --compare evals/a evals/b",
))
def eval_(
    ctx: typer.Context,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Student to evaluate: exported folder, run folder or hub id. Repeat to compare several.")] = None,
    metrics: Annotated[Optional[list[str]], typer.Option("--metrics", help="Metrics: pickscore clipscore hpsv2 aesthetic fid hpsv3 imagereward ocr dpg (alias dpgbench), space- or comma-separated.")] = None,
    prompts: Annotated[str, typer.Option(help="Prompt set (pickscore-test, dpg-bench, ocr, coco-2014-10k) or a .txt/.jsonl file.")] = "pickscore-test",
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Result folder (default evals/<model name>; several models: one folder each under it).")] = None,
    phase: Annotated[str, typer.Option(help="generate, score or all. Each phase resumes where it stopped.")] = "all",
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: the student's own).")] = None,
    sigmas: Annotated[Optional[str], typer.Option(help="Unshifted schedule, e.g. 1,0.75,0.5,0.25 (instead of --steps).")] = None,
    seed: Annotated[int, typer.Option(help="Base seed: image j of prompt i uses seed + i * num-per-prompt + j.")] = 0,
    num_per_prompt: Annotated[int, typer.Option(min=1, help="Images per prompt.")] = 1,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N prompts.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Generation batch size (images do not depend on it).")] = 4,
    score_batch_size: Annotated[int, typer.Option(min=1, help="Scoring batch size.")] = 8,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the student's resolution).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width (default: the student's resolution).")] = None,
    checkpoint: Annotated[str, typer.Option(help="For a run folder: checkpoint step, 'latest' or 'best'.")] = "latest",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="For a run folder: sample the EMA weights.")] = True,
    device: Annotated[Optional[str], typer.Option(help="Device (default: this rank's GPU, else cpu).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Student dtype (default bf16 on GPU, fp32 on CPU).")] = None,
    metric_option: Annotated[Optional[list[str]], typer.Option("--metric-option", help="METRIC.OPTION=VALUE, e.g. fid.reference=coco-2014-10k (repeatable).")] = None,
    rescore: Annotated[bool, typer.Option("--rescore", help="Discard stored scores of these metrics and score again.")] = False,
    cache_embeddings: Annotated[bool, typer.Option("--cache-embeddings/--no-cache-embeddings", help="Sample from the on-disk prompt-embedding cache (encoded once per text encoder and prompt set; the text encoders are freed) instead of encoding prompts per batch.")] = True,
    embedding_cache: Annotated[Optional[str], typer.Option(help="Embedding cache folder (default $CDMCTL_CACHE/embeddings, as distill's).")] = None,
    compare: Annotated[Optional[list[str]], typer.Option("--compare", help="Only print one table over these result folders.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help=SCHEDULER_HELP + " Replaces each model's own sampler (e.g. a teacher's training-free baseline).")] = None,
    shift: Annotated[Optional[float], typer.Option(help=SHIFT_HELP)] = None,
) -> None:
    """Generate images for a prompt set and score them (PickScore, HPS, FID, ...); or compare result folders."""
    refuse_metric_option_as_out(out)
    from cdmctl import evaluate as ev
    from cdmctl.outputs import check_not_file
    from cdmctl.samplers import check_levels_fit, check_sampler, check_shift

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
    out = out or ev.default_out(models)
    check_not_file(out)
    options = ev.parse_metric_options(metric_option or [])
    if ev.check_phase(phase) != "generate":
        ev.prepare_metrics(names, options)  # unknown metrics fail before any library loads (run_eval checks again)
    from cdmctl.prompt_sets import SETS, load_eval_prompts

    if phase != "score" and prompts not in SETS:  # a named set is fetched when it is used
        load_eval_prompts(prompts, limit)  # a missing or empty prompt file: refused before torch and any model load
    from cdmctl.generate import check_device, check_steps, parse_sigmas

    levels, steps, device = parse_sigmas(sigmas), check_steps(steps), check_device(device)
    check_sampler(scheduler), check_shift(shift), check_levels_fit(scheduler, levels)
    _quiet_libraries()
    with interrupt_line(f"the images and scores finished so far are kept in {out}; run the same command again to "
                        "continue from there"), progress_bar() as bar:  # fmt: skip
        rows = ev.run_eval(
            models, prompts, names, out, phase=phase,
            metric_options=options, limit=limit, steps=steps, sigmas=levels, seed=seed,
            num_per_prompt=num_per_prompt, batch_size=batch_size,
            score_batch_size=score_batch_size, height=height, width=width, checkpoint=checkpoint, ema=ema,
            device=device, dtype=dtype, rescore=rescore,
            embeddings=ev.EmbeddingSettings(cache_embeddings, embedding_cache), scheduler=scheduler, shift=shift,
            note=lambda line: console.print(line, highlight=False, markup=False), progress=bar,
        )  # fmt: skip
    if rows:
        console.print(ev.render_table(rows))
        for row in rows:
            console.print(f"  {row['label']}: {row['folder']}/summary.md", highlight=False, markup=False)


@contextmanager
def progress_bar():
    """eval's progress: one bar per phase (generation, each metric), on stderr; (label, done, total) updates it.
    The display starts with the first update, so a command that fails before any work prints nothing extra."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=err_console, transient=False)  # fmt: skip
    bars: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if not bars:
            progress.start()
        if label not in bars:
            bars[label] = progress.add_task(label, total=total)
        progress.update(bars[label], completed=done, total=total)

    try:
        yield update
    finally:
        if bars:
            progress.stop()


@app.command(epilog=examples("cdmctl report runs/demo --out report",
                              "cdmctl report runs/demo runs/demo-seed1 --out compare"))
def report(
    runs: Annotated[list[str], typer.Argument(help="Run folders written by `cdmctl distill` (several: compared).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the plots, summary.md and sample sheets.")] = "report",
) -> None:
    """Plots of the training curves and evaluated scores, a summary table and sheets of evaluation samples."""
    from cdmctl.report import write_report

    written = write_report(runs, out)
    console.print(f"[bold green]report[/] {escape(str(out))}", soft_wrap=True, highlight=False)
    for path in written:
        console.print(f"  {path}", soft_wrap=True, highlight=False, markup=False)


@presets_app.command("list", epilog=examples("cdmctl presets list", "cdmctl presets list | grep longcat"))
def presets_list() -> None:
    """Name, method, model and one-line description of every built-in preset."""
    from cdmctl.config import builtin_presets, load_preset

    rows = [("preset", "method", "model", "description")]
    for name in sorted(builtin_presets()):
        p = load_preset(name)
        rows.append((name, p.method.name, p.model.pretrained, p.description))
    # Plain columns, never cut or wrapped to the terminal: hub ids and names ("FLUX.2 [klein]") stay whole.
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])


@presets_app.command("show", epilog=examples(
    "cdmctl presets show sd3-4nfe",
    "cdmctl presets show my.yaml --set method.guidance=5 --no-docs",
))
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


def refuse_metric_option_as_out(out: str | None) -> None:
    """`-o` means --out in every command; before 0.2.0 it was eval's --metric-option. A value that reads as a
    metric option would silently become a result folder named like one, so it is refused."""
    import re

    if out and re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_.]+=.*", out):
        raise UserError(f"--out/-o got '{out}', which reads as a metric option (-o is --out since 0.2.0)",
                        f"write --metric-option {out}")  # fmt: skip


def _quiet_libraries() -> None:
    """Silence diffusers/transformers (imports them: seconds), so only once the arguments are known good."""
    from cdmctl.quiet import quiet_libraries

    quiet_libraries()


@contextmanager
def interrupt_line(where: str):
    """Ctrl-C in a command without a run folder: one line saying what is kept, exit 130 (as distill).

    The signal is recorded as well as raised: a library may turn the KeyboardInterrupt into an error of its own
    (safetensors' loader, interrupted while diffusers reads weights, surfaces as "Unable to load weights"), and
    whatever then ends the command is still reported as the interrupt it was."""
    import signal

    received: list[int] = []

    def on_sigint(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except BaseException as exc:
        if not (received or isinstance(exc, KeyboardInterrupt)):
            raise
        err_console.print(f"interrupted (SIGINT): {where}", soft_wrap=True, highlight=False, markup=False)
        raise typer.Exit(EXIT_SIGNAL["SIGINT"]) from None
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_line(stop, preset: str, overrides: list[str]) -> str:
    """One line: what stopped the run, the checkpoint it resumes from, and the command that does it."""
    command = ["cdmctl", "distill", "--preset", preset, *(a for o in overrides for a in ("--set", o)),
               "--out", str(stop.folder)]  # fmt: skip
    head = f"interrupted ({stop.signal_name}) at iteration {stop.iteration}"
    if stop.checkpoint is None:
        return f"{head}: no checkpoint yet, nothing to resume; start again with: {shlex.join(command[:-1])} NEW_DIR"
    return f"{head}: last checkpoint {stop.checkpoint}; resume with: {shlex.join([*command, '--resume'])}"


@contextmanager
def sigterm_outlived_while_reporting():
    """Several processes: when a rank fails, the launcher SIGTERMs the others at once, and a survivor must live long
    enough to say why it stops. Yields a list: once something is appended (the failure is being reported), SIGTERM
    waits; before, it ends the process as it always did (the run layer's own handling covers the training loop)."""
    import os
    import signal

    reporting: list[bool] = []

    def on_sigterm(signum, frame):
        if not reporting:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield reporting
    finally:
        signal.signal(signal.SIGTERM, previous)


def rank_failure_line(exc: Exception, folder, preset: str, overrides: list[str]) -> str | None:
    """Several processes: one line saying which rank failed, or that this one stopped because another did, and how
    to resume (None on one process, and for errors the CLI reports anyway). A rank's own failure keeps its
    traceback above the line: that is the bug to report."""
    import os

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("RANK", "0")
    if world == 1 or isinstance(exc, UserError) or isinstance(exc, click_classes("Exit")):
        return None
    from cdmctl.engine import checkpoint as ckpt
    from cdmctl.parallel import lost_a_peer

    existing = ckpt.list_checkpoints(folder)
    command = ["cdmctl", "distill", "--preset", preset, *(a for o in overrides for a in ("--set", o)),
               "--out", str(folder), "--resume"]  # fmt: skip
    resume = (f"last checkpoint {existing[-1].name}; resume with the same launch and: {shlex.join(command)}"
              if existing else "no checkpoint yet: start again")  # fmt: skip
    if lost_a_peer(exc):
        cause = re.sub(r"^\[[^\]]*\] ", "", " ".join(str(exc).split())).split(". ")[0][:160]  # gloo: "[file:line] ..."
        return (f"error: rank {rank} of {world} stopped: another rank failed, was killed or stopped answering "
                f"(its own error line, or the launcher's report, names it; here: {cause}); {resume}")
    import traceback

    traceback.print_exc()
    return f"error: rank {rank} of {world} failed: {type(exc).__name__}: {exc}; the other ranks stop with it; {resume}"


def _print_yaml(data: dict) -> None:
    import yaml

    console.print(yaml.safe_dump(data, sort_keys=False), highlight=False, markup=False, soft_wrap=True, end="")


def main() -> None:
    """Entry point: usage and user errors print one line (and a fix) and exit 2; training failures exit 1."""
    try:
        code = app(standalone_mode=False)  # returns the code of a typer.Exit / --help instead of exiting
    except UserError as exc:
        print_error(exc.message, exc.fix)
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
    except Exception as exc:
        sys.exit(_exit_code(exc))
    if isinstance(code, int) and code:
        sys.exit(code)


def print_error(message: str, fix: str | None = None) -> None:
    fix_line = f"\n  fix: {escape(fix)}" if fix else ""
    err_console.print(f"[bold red]error:[/] {escape(message)}{fix_line}", soft_wrap=True, highlight=False)


def _exit_code(exc: Exception) -> int:
    """Print what a user needs to see of a non-UserError and return the exit code; re-raise real bugs."""
    if isinstance(exc, click_classes("Exit")):
        return exc.exit_code
    if isinstance(exc, click_classes("Abort")):  # older clicks' Ctrl-C; typer >= 0.2x returns Exit(130) instead
        return EXIT_SIGNAL["SIGINT"]  # silent under both, as a shell command stopped by Ctrl-C is
    if isinstance(exc, click_classes("ClickException")):
        print_click_error(exc)
        return exc.exit_code
    from cdmctl.engine.loop import TrainingDiverged

    if isinstance(exc, TrainingDiverged):
        err_console.print(f"[bold red]training stopped:[/] {escape(str(exc))}", soft_wrap=True)
        return 1
    raise exc


def click_classes(name: str) -> tuple[type, ...]:
    """Class `name` of every click that may raise here: typer >= 0.2x vendors click as `typer._click` (with
    Exit and Abort in typer.exceptions), older typers use the `click` package; either may be installed."""
    found: list[type] = []
    for module in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def print_click_error(exc) -> None:
    """click's message on one line; for usage errors the fix names the usage and the command's --help."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None or exc.exit_code != EXIT_USAGE:
        print_error(message)
        return
    usage = " ".join(ctx.get_usage().split()).removeprefix("Usage:").strip()
    print_error(message, f"usage: {usage} (more in `{ctx.command_path} --help`)")


if __name__ == "__main__":
    main()
