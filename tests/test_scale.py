"""Several processes on CPU (torchrun, gloo), through the installed `cdmctl`: DDP and accelerate's FSDP2 (full and
LoRA, gradient checkpointing on) complete, log once, write hashed checkpoints, resume to every tensor of an
uninterrupted run, and end within a stated tolerance of a one-process run with the same global batch. FSDP2 also
resumes on another world size (re-sharded) and exports on one process; LongCat-Image LoRA under FSDP2 matches one
process too.

Why a difference to one process remains: every sample, level and noise is drawn identically (per-sample draws are
made for the global batch and each rank takes its rows), so what differs is float32 rounding only: each rank runs
its samples in smaller batches (other matmul blockings), and gradients are averaged across ranks in another order.
After 4 iterations at learning rate 1e-3 the weights moved by about 4e-3 and the runs differ by a few 1e-6 at
most, 0.1% of the distance (Adam divides each gradient by its own running scale, so rounding in tiny gradients shows up in full).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdmctl.engine import checkpoint as ckpt
from cdmctl.parallel import DDP, FSDP2, SINGLE, effective_strategy
from cdmctl.errors import UserError
from tests.test_kill import tensors_of
from tests.test_run_folder import CDMCTL

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 4
RTOL = 5e-3  # |N-process - 1-process| in any weight, as a share of how far the weights moved (module docstring)
# mode -> (how the processes are launched, preset overrides)
MODES = {
    "ddp": ("torchrun", []),
    "fsdp2": ("torchrun", ["parallel.strategy=fsdp2", "model.gradient_checkpointing=true"]),
    # FSDP2 chosen by accelerate's own config (the shipped one), parallel.strategy left at auto; the frozen base
    # of the LoRA trees is sharded too, the teacher replicated (the other placement)
    "fsdp2-lora": ("launch/fsdp2-1node.yaml", ["model.gradient_checkpointing=true", "parallel.teacher=replicate",
                                               "model.train=lora", "model.lora.rank=4", "model.lora.alpha=8"]),
}


def settings(model: Path, iterations: int, extra: list[str], drop: tuple[str, ...] = ()) -> list[str]:
    values = {"model.pretrained": model, "model.resolution": 32, "model.precision": "fp32",
              "model.gradient_checkpointing": "false", "model.text_length": 8, "method.schedule.length": "[1, 4]",
              "train.iterations": iterations, "train.batch_size": 6, "optim.student_lr": 1e-3,
              "optim.fake_lr": 1e-3, "optim.warmup_steps": 1, "run.log_every": 1, "run.sample_every": 0,
              "run.checkpoint_every": 2, "data.prompts": "builtin:toy", "data.sample_prompts": "[a red cat]"}  # fmt: skip
    pairs = [f"{k}={v}" for k, v in values.items() if k not in drop] + extra
    return [a for pair in pairs for a in ("--set", pair)]


def run(out: Path, extra: list[str], processes: int = 1, iterations: int = ITERATIONS, resume: bool = False,
        model: Path | None = None, launcher: str = "torchrun") -> subprocess.CompletedProcess:  # fmt: skip
    args = ["distill", "--preset", "sd3-4nfe", "--out", str(out), "--plain", *settings(model, iterations, extra)]
    args += ["--resume"] if resume else []
    bin_dir = Path(CDMCTL).parent  # torchrun and accelerate from the same environment as the installed cdmctl
    if processes == 1:
        cmd = [CDMCTL, *args]
    elif launcher == "torchrun":
        cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(processes), "-m", "cdmctl.cli", *args]
    else:  # accelerate launch with one of the shipped configs, sized down to this machine
        cmd = [str(bin_dir / "accelerate"), "launch", "--config_file", str(ROOT / launcher), "--num_processes",
               str(processes), "-m", "cdmctl.cli", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # PYTHONPATH goes along to every rank
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final(out: Path) -> Path:
    last = ckpt.list_checkpoints(out)[-1]
    assert last.name == ckpt.checkpoint_name(ITERATIONS)
    return last


def state_tensors(checkpoint: Path, tmp: Path) -> dict[str, object]:
    """Every tensor a checkpoint stores, by file and key: torch distributed checkpoints read whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    found = {}
    tmp.mkdir(parents=True, exist_ok=True)
    for path in sorted(checkpoint.rglob("*")):
        rel = path.relative_to(checkpoint).as_posix()
        if path.name == ".metadata":  # a DCP folder: its shards gathered into one state
            target = tmp / (rel.replace("/", "_") + ".pt")
            dcp_to_torch_save(path.parent, target)
            value = torch.load(target, weights_only=False)
        elif path.suffix == ".safetensors":
            value = load_file(str(path))
        elif path.suffix in {".bin", ".pkl", ".pt"}:
            value = torch.load(path, map_location="cpu", weights_only=False)
        else:
            continue
        found.update({f"{rel}/{k}": v for k, v in tensors_of(value).items()})
    return found


def assert_identical(a: Path, b: Path, tmp: Path) -> None:
    ta, tb = state_tensors(a, tmp / "a"), state_tensors(b, tmp / "b")
    assert ta.keys() == tb.keys() and any("state/" in k for k in ta)
    for key, va in ta.items():
        vb = tb[key]
        same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else repr(va) == repr(vb)
        assert same, f"{key} differs after resume"


def max_difference(a: Path, b: Path, which: str) -> float:
    wa, wb = ckpt.load_weights(a, which), ckpt.load_weights(b, which)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def model(tiny_sd3_dir) -> Path:
    return tiny_sd3_dir


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory):
    """The one-process run for a mode's overrides, made once per module: DDP and FSDP2 compare with the same one
    (gradient checkpointing recomputes the same values; the parallel.* settings mean nothing on one process)."""
    made: dict[tuple[str, ...], Path] = {}

    def get(extra: list[str]) -> Path:
        key = tuple(e for e in extra if not e.startswith(("parallel.", "model.gradient_checkpointing")))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("one") / "run"
            ok(run(made[key], list(key), model=model))
        return made[key]

    return get


def interrupted_copy(run_folder: Path, to: Path) -> Path:
    """A copy of a finished run as a run stopped after its checkpoint 2 leaves it: the final checkpoint gone (its
    metrics lines stay, for the resume to trim), so that a resume must train iterations 3 and 4 again."""
    shutil.copytree(run_folder, to)
    shutil.rmtree(final(to))
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(to)] == [2]
    return to


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_complete_resume_exactly_and_match_one_process(mode, model, one_process, tmp_path):
    launcher, extra = MODES[mode]
    one = one_process(extra)
    whole = tmp_path / "whole"
    done = ok(run(whole, extra, processes=2, model=model, launcher=launcher))
    assert done.stdout.count(f"done {ITERATIONS} iterations") == 1  # only the main process reports
    split = interrupted_copy(whole, tmp_path / "split")
    if mode == "fsdp2":
        shutil.copytree(split, tmp_path / "reshard")  # resumed on 3 processes below
    ok(run(split, extra, processes=2, resume=True, model=model, launcher=launcher))

    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, ITERATIONS + 1))  # logged once per iteration
    assert records[-1]["processes"] == 2 and records[-1]["throughput/samples_s"] > 0
    assert "memory/host_peak_gb" in records[-1]
    assert records[-1]["cost/total_fake_bwd"] == ITERATIONS * 3  # per process: 3 of the global 6
    logged = [json.loads(line)["iteration"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, ITERATIONS + 1))

    a, b = final(whole), final(split)
    manifest = ckpt.verify_checkpoint(a)  # every file hashed, the sharded state included
    expected = FSDP2 if mode.startswith("fsdp2") else DDP
    assert manifest["parallel"] == {"strategy": expected, "processes": 2}
    if expected == FSDP2:
        assert any(k.startswith("state/pytorch_model_fsdp_1/__1_0.distcp") for k in manifest["sha256"])
    assert_identical(a, b, tmp_path)
    distance = moved(a, model)
    for which in ("student", "ema"):
        difference = max_difference(a, final(one), which)
        print(f"{mode} {which}: max |2 processes - 1| = {difference:.3g}, moved {distance:.3g}")
        assert difference <= RTOL * distance, which
    if mode == "fsdp2-lora":
        assert_frozen_base_sharded(a)
    if mode == "fsdp2":
        check_reshard_and_export(tmp_path, extra, model, final(one))


def moved(checkpoint: Path, model: Path) -> float:
    """How far the student got from the teacher (full: in any weight; LoRA: the adapter's B, zero at start)."""
    student = ckpt.load_weights(checkpoint, "student")
    if any("lora_" in k for k in student):
        return max(float(v.abs().max()) for k, v in student.items() if "lora_B" in k)
    teacher = load_file(str(next((model / "transformer").glob("*.safetensors"))))
    return max(float((student[k] - teacher[k]).abs().max()) for k in student)


def assert_frozen_base_sharded(checkpoint: Path) -> None:
    """The student tree's frozen base weights are stored in two shards, one per rank."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(checkpoint / "state" / "pytorch_model_fsdp_0")).read_metadata()
    base = [k for k in meta.state_dict_metadata if k.endswith("attn.to_q.base_layer.weight")]
    assert base and all(len(meta.state_dict_metadata[k].chunks) == 2 for k in base)


def check_reshard_and_export(tmp_path: Path, extra: list[str], model: Path, reference: Path) -> None:
    folder = tmp_path / "reshard"
    ok(run(folder, extra, processes=3, resume=True, model=model))  # 2 processes' shards loaded by 3
    assert ckpt.read_manifest(final(folder))["parallel"]["processes"] == 3
    difference = max_difference(final(folder), reference, "student")
    print(f"fsdp2 resumed on 3 processes: max |3 - 1| = {difference:.3g}")
    assert difference <= RTOL * moved(final(folder), model)
    # one process: the export reads the whole tensors stored beside the shards
    out = tmp_path / "exported"
    ok(subprocess.run([CDMCTL, "export", str(folder), "--out", str(out), "--checkpoint", "2"], capture_output=True,
                      text=True, timeout=300))  # fmt: skip
    exported = load_file(str(next((out / "transformer").glob("*.safetensors"))))
    ema = ckpt.load_weights(ckpt.find_checkpoint(folder, 2), "ema")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    # and one process cannot resume it: said in one line, before the libraries load
    refused = subprocess.run([CDMCTL, *["distill", "--preset", "sd3-4nfe", "--out", str(folder), "--plain",
                              "--resume", *settings(model, ITERATIONS + 2, ["model.gradient_checkpointing=true"])]],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "is sharded (FSDP2)" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "setting, env, expected",
    [
        ("auto", {}, SINGLE),
        ("auto", {"WORLD_SIZE": "8"}, DDP),
        ("ddp", {"WORLD_SIZE": "8"}, DDP),
        ("fsdp2", {"WORLD_SIZE": "8"}, FSDP2),
        ("auto", {"WORLD_SIZE": "16", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, FSDP2),
        ("fsdp2", {"WORLD_SIZE": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "several processes"),
        ("auto", {"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1"),
        ("ddp", {"WORLD_SIZE": "8", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "accelerate's config"),
        ("fsdp2", {}, "several processes"),
    ],
)
def test_the_strategy_follows_the_preset_and_accelerate_config(setting, env, expected):
    if expected in (SINGLE, DDP, FSDP2):
        assert effective_strategy(setting, env) == expected
    else:
        with pytest.raises(UserError, match=expected):
            effective_strategy(setting, env)


def accelerate_env(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives each process (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_machines", "1",
                                               "--machine_rank", "0", "train.py"])  # fmt: skip
    args, *_ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, expected", [("ddp-1node.yaml", DDP), ("fsdp2-1node.yaml", FSDP2),
                                            ("fsdp2-multinode.yaml", FSDP2)])
def test_the_shipped_accelerate_configs_launch_what_they_say(name, expected):
    config = ROOT / "launch" / name
    env = accelerate_env(config)
    assert effective_strategy("auto", {**env, "WORLD_SIZE": "8"}) == expected


def test_fsdp2_on_one_process_is_refused_in_one_line_before_the_libraries_load(tmp_path):
    import sys

    args = ["distill", "--preset", "demo", "--out", str(tmp_path / "r"), "--set", "parallel.strategy=fsdp2"]
    done = subprocess.run([sys.executable, "-X", "importtime", CDMCTL, *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and lines[0].startswith("error: parallel.strategy fsdp2 needs several processes")
    assert lines[1].startswith("  fix: ") and len(lines) == 2
    assert "| diffusers" not in done.stderr and "| transformers" not in done.stderr


def test_fsdp2_refuses_the_8bit_optimizers():
    from cdmctl.config.load import load_preset
    from cdmctl.parallel import check_supported

    preset = load_preset("sd3-4nfe", ["optim.optimizer=adamw-8bit"])
    check_supported(preset, DDP)
    with pytest.raises(UserError, match="does not work with FSDP2"):
        check_supported(preset, FSDP2)


def test_longcat_lora_under_fsdp2_matches_one_process(tiny_longcat_dir, tmp_path):
    """The second family: two block classes to shard, packed latents, int64 text position ids in the cache."""
    extra = ["model.train=lora", "model.lora.rank=4", "model.lora.alpha=8", "model.gradient_checkpointing=true",
             "method.guidance=4.5"]  # fmt: skip

    def longcat(out: Path, processes: int, more: list[str]) -> None:
        args = ["distill", "--preset", "longcat-4nfe", "--out", str(out), "--plain",
                *settings(tiny_longcat_dir, ITERATIONS, extra + more, drop=("model.text_length",))]  # fmt: skip
        launch = [str(Path(CDMCTL).parent / "torchrun"), "--nproc_per_node", str(processes), "-m", "cdmctl.cli"]
        ok(subprocess.run([*(launch if processes > 1 else [CDMCTL]), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}))  # fmt: skip

    longcat(tmp_path / "one", 1, [])
    longcat(tmp_path / "two", 2, ["parallel.strategy=fsdp2"])
    a, b = final(tmp_path / "two"), final(tmp_path / "one")
    assert ckpt.read_manifest(a)["parallel"] == {"strategy": FSDP2, "processes": 2}
    assert max_difference(a, b, "student") <= RTOL * moved(b, tiny_longcat_dir)


@pytest.mark.parametrize("family", ["flux2-klein", "qwenimage", "zimage"])
def test_the_other_families_under_fsdp2_match_one_process(family, tiny_family_dir, tmp_path):
    """FLUX.2 [klein] (two block classes, 4-axis int64 ids), Qwen-Image (masked text cut per batch) and Z-Image
    (list inputs, caption lengths): a LoRA student on 2 FSDP2 processes matches one process."""
    model, preset = tiny_family_dir(family), f"{family}-4nfe"
    extra = ["model.train=lora", "model.lora.rank=4", "model.lora.alpha=8", "model.gradient_checkpointing=true"]

    def distil(out: Path, processes: int, more: list[str]) -> None:
        args = ["distill", "--preset", preset, "--out", str(out), "--plain",
                *settings(model, ITERATIONS, extra + more, drop=("model.text_length",))]  # fmt: skip
        launch = [str(Path(CDMCTL).parent / "torchrun"), "--nproc_per_node", str(processes), "-m", "cdmctl.cli"]
        ok(subprocess.run([*(launch if processes > 1 else [CDMCTL]), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False))  # fmt: skip

    distil(tmp_path / "one", 1, [])
    distil(tmp_path / "two", 2, ["parallel.strategy=fsdp2"])
    a, b = final(tmp_path / "two"), final(tmp_path / "one")
    assert ckpt.read_manifest(a)["parallel"] == {"strategy": FSDP2, "processes": 2}
    assert max_difference(a, b, "student") <= RTOL * moved(b, model)
