"""A run's checkpoints: what one holds (the manifest, the whole student and its EMA), writing it from every process,
and putting a run back exactly as one left it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cdmctl.engine import checkpoint as ckpt
from cdmctl.networks import lora_key
from cdmctl.runfolder import trim_metrics

if TYPE_CHECKING:
    from cdmctl.run import DistillRun


def manifest(run: "DistillRun") -> dict[str, Any]:
    """What the checkpoint's manifest records of the run besides its files: counters, RNG, cost, model, preset."""
    p = run.preset
    return {
        **run.distiller.state(),
        "cost_totals": run.distiller.cost.state_dict(),
        "backbone": p.model.backbone,
        "base_model": run.source,
        "revision": p.model.revision,
        "train": p.model.train,
        "lora": p.model.lora.model_dump() if p.model.train == "lora" else None,
        "preset": p.model_dump(mode="json"),
        "prompts_sha256": run.prompts_sha256,
        # how state/ was written: sharded (FSDP2, torch distributed checkpoint) or whole (one process, DDP)
        "parallel": {"strategy": run.strategy, "processes": run.accelerator.num_processes},
    }


def save_checkpoint(run: "DistillRun", iteration: int) -> Path:
    """Every process saves its accelerate state into one staging folder; the main one finalizes it."""
    from cdmctl.outputs import reporting_disk_full

    acc = run.accelerator
    staging = ckpt.staging_dir(run.folder, iteration)
    discard = (lambda: shutil.rmtree(staging, ignore_errors=True)) if acc.is_main_process else None
    with reporting_disk_full(staging, cleanup=discard):
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging / "state"))
        tensors = student_tensors(run)
        final = staging.parent / ckpt.checkpoint_name(iteration)
        if acc.is_main_process:
            final = ckpt.finalize_checkpoint(staging, iteration, manifest(run), tensors,
                                             keep=run.preset.run.keep_checkpoints, protect=kept_apart(run.folder))
    acc.wait_for_everyone()
    return final


def kept_apart(folder: Path) -> set[str]:
    """Checkpoints that pruning leaves alone: the best one (RUN/best.json)."""
    from cdmctl.trainingeval import read_best

    best = read_best(folder)
    return {Path(best["checkpoint"]).name} if best else set()


def student_tensors(run: "DistillRun") -> dict[str, dict[str, torch.Tensor]]:
    """What export needs: the full student (or only its adapter, for LoRA) and its EMA, same keys, whole
    tensors whatever the sharding. Collective under FSDP2 (every rank gathers); only the main process keeps
    them (it writes them), the others get empty dicts."""
    from cdmctl.engine.sharding import gathered

    acc = run.accelerator
    keep = acc.is_main_process
    student = acc.unwrap_model(run.roles.student_module)
    if run.preset.model.train == "lora":
        from peft import get_peft_model_state_dict

        tensors = {"student": gathered(get_peft_model_state_dict(student), keep=keep)}
        if run.ema is not None:
            tensors["ema"] = {lora_key(k): v for k, v in run.ema.state_dict(keep=keep).items()}
        return tensors
    state = acc.get_state_dict(run.roles.student_module)  # gathered onto the main process under FSDP2
    tensors = {"student": state if keep else {}}
    if run.ema is not None:
        tensors["ema"] = run.ema.merged_state_dict(state=state, keep=keep)  # loadable strictly
    return tensors


def restore(run: "DistillRun", checkpoint: Path) -> None:
    """Weights, optimizer states, EMA and counters exactly as they were saved. `checkpoint` comes from
    `runfolder.opened_run`, which already checked every one of its files against the manifest."""
    run.accelerator.load_state(str(checkpoint / "state"))  # FSDP2: re-sharded onto this world size
    if run.ema is not None:
        # read tensor by tensor (each rank keeps its part), never the whole file at once; verified with the rest
        rename = {k: lora_key(k) for k in run.ema.shadow} if run.preset.model.train == "lora" else None
        stored = checkpoint / ckpt.read_manifest(checkpoint)["files"]["ema"]
        run.ema.load_state_dict(ckpt.LazyWeights(stored, rename))
    saved = ckpt.read_manifest(checkpoint)
    run.distiller.load_state(saved)
    run.distiller.cost.load_state_dict(saved["cost_totals"])
    trim_metrics(run.folder, run.distiller.counters.iteration)
    if run.evaluator is not None:  # evaluations up to the checkpoint are kept, not repeated
        from cdmctl.runlog import read_metrics
        from cdmctl.trainingeval import replay

        run.evaluator.totals = replay(run.selection, read_metrics(run.folder))
