"""TBCM end to end on the tiny SD3 pipeline, through the installed `cdmctl`: distill, exact resume, export, generate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cdmctl.engine.checkpoint import list_checkpoints, load_weights, read_manifest

CDMCTL = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")
ROUTE = 4  # route levels: 3 training points per prompt
BATCH = 2


def tiny_tbcm(model_dir: Path, prompts: Path, iterations: int) -> list[str]:
    """sd3-tbcm shrunk to the tiny pipeline: the same method (autograd JVP, guided rollouts), CPU-sized."""
    values = {
        "model.pretrained": str(model_dir), "model.resolution": 32, "model.precision": "fp32",
        "model.gradient_checkpointing": "false", "model.text_length": 8,
        "method.tbcm.route_steps": ROUTE, "method.tbcm.guidance": "[2.0, 3.0]", "method.tbcm.tangent_warmup": 2,
        "train.iterations": iterations, "train.batch_size": BATCH, "optim.student_lr": 1e-3, "optim.warmup_steps": 1,
        "run.log_every": 1, "run.sample_every": 0, "run.checkpoint_every": 2,
        "data.prompts": str(prompts), "data.sample_prompts": "[a red cube, a blue ball]",
    }  # fmt: skip
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def cdmctl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([CDMCTL, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cube\na blue ball\na green tree on a hill\n")
    return path


@pytest.fixture(scope="module")
def tbcm_run(tiny_sd3_dir: Path, prompts: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tbcm") / "run"
    done = cdmctl("distill", "--preset", "sd3-tbcm", "--out", str(out), "--plain", *tiny_tbcm(tiny_sd3_dir, prompts, 4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done 4 iterations" in done.stdout
    (out.parent / "distill.log").write_text(done.stdout + done.stderr)  # what the dashboard printed
    return out


def test_a_tbcm_run_trains_the_student_alone_and_logs_its_cost(tbcm_run: Path, tiny_sd3_dir: Path):
    records = [json.loads(line) for line in (tbcm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    last, points = records[-1], (ROUTE - 1) * BATCH
    assert (last["student_step"], last["fake_step"], last["nonfinite"]) == (4, 0, 0)
    # per update: ROUTE guided teacher calls (cond + uncond), the JVP (autograd: 3 forwards), one forward/backward
    assert (last["cost/teacher_fwd"], last["cost/student_fwd"], last["cost/student_bwd"]) == (ROUTE * 2 * BATCH, points, points)
    assert last["cost/student_jvp_fwd"] == 3 * points and last["cost/total_student_jvp_fwd"] == 4 * 3 * points
    assert not any(k.startswith("cost/fake") for k in last)
    # the dashboard's lines carry the same per-update and cumulative cost
    lines = (tbcm_run.parent / "distill.log").read_text().splitlines()
    shown = [line for line in lines if line.startswith("it 4/4 | student_step")]
    assert shown and f"cost/student_jvp_fwd {3 * points}" in shown[0]
    assert f"cost/teacher_fwd {ROUTE * 2 * BATCH}" in shown[0] and f"cost/total_student_bwd {4 * points}" in shown[0]
    stats = {"loss/student", "loss/scm_unweighted", "loss/logvar", "tbcm/r", "tbcm/g_norm", "tbcm/jvp_norm"}
    assert stats <= last.keys()
    ckpt = list_checkpoints(tbcm_run)[-1]
    assert read_manifest(ckpt)["preset"]["method"]["name"] == "tbcm"
    assert (ckpt / "state" / "model_1.safetensors").is_file()  # the log-variance head, beside the student
    base = load_file(str(next((tiny_sd3_dir / "transformer").glob("*.safetensors"))))
    student = load_weights(ckpt, "student")
    assert student.keys() == base.keys() and any(not torch.equal(base[k], student[k]) for k in base)


def state_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: student, EMA, the head, and both optimizers (the student's and the head's)."""
    out = {f"{w}/{k}": v for w in ("student", "ema") for k, v in load_weights(ckpt, w).items()}
    for f in sorted((ckpt / "state").glob("model*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(str(f)).items()})
    optimizers = sorted((ckpt / "state").glob("optimizer*.bin"))
    assert [f.name for f in optimizers] == ["optimizer.bin", "optimizer_1.bin"]
    for f in optimizers:
        for pid, st in torch.load(f, weights_only=False)["state"].items():
            out.update({f"{f.stem}/{pid}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def test_resume_matches_uninterrupted_run(tbcm_run: Path, tiny_sd3_dir: Path, prompts: Path, tmp_path: Path):
    split = tmp_path / "split"
    half = cdmctl("distill", "--preset", "sd3-tbcm", "--out", str(split), "--plain", *tiny_tbcm(tiny_sd3_dir, prompts, 2))
    assert half.returncode == 0, half.stderr[-3000:]
    rest = cdmctl("distill", "--preset", "sd3-tbcm", "--out", str(split), "--plain", "--resume",
                  *tiny_tbcm(tiny_sd3_dir, prompts, 4))  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = list_checkpoints(tbcm_run)[-1], list_checkpoints(split)[-1]
    ta, tb = state_tensors(a), state_tensors(b)
    assert ta.keys() == tb.keys() and any(k.startswith("model_1/") for k in ta)
    assert any(k.startswith("optimizer_1/") for k in ta)  # the head's Adam moments
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert read_manifest(a)["cost_totals"] == read_manifest(b)["cost_totals"]


@pytest.fixture(scope="module")
def exported(tbcm_run: Path) -> Path:
    out = tbcm_run.parent / "student"
    done = cdmctl("export", str(tbcm_run), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_export_samples_with_plain_diffusers_exactly_like_the_consistency_sampler(exported: Path):
    """Plain diffusers: FlowMatchEulerDiscreteScheduler with stochastic_sampling, the student's own weights."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from cdmctl.engine.trigflow import consistency_sample

    info = json.loads((exported / "cdmctl.json").read_text())
    # the authors' 2-step TrigFlow times t = [pi/2, 1.0]: flow levels 1 and sin 1 / (sin 1 + cos 1), unshifted
    assert (info["sampler"], info["steps"], info["level_rule"]) == ("consistency", 2, "trigflow")
    assert info["levels"] == pytest.approx([1.0, 0.608979], abs=1e-6)
    pipe = DiffusionPipeline.from_pretrained(exported)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.stochastic_sampling
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    torch.manual_seed(123)  # the scheduler's fresh noise comes from the global generator
    latents = pipe("a red cube", sigmas=info["levels"], guidance_scale=1.0, max_sequence_length=8, height=32, width=32,
                   generator=torch.Generator().manual_seed(7), output_type="latent").images  # fmt: skip
    embeds, _, pooled, _ = pipe.encode_prompt("a red cube", None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=8)  # fmt: skip
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)
    renoise = torch.randn((1, *latents.shape))
    levels = torch.tensor(info["levels"])  # sampled as given: the scheduler's shift is 1

    def velocity(x, s, rows):
        return pipe.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                timestep=s * 1000, return_dict=False)[0]  # fmt: skip

    ours = consistency_sample(velocity, noise, levels, renoise)
    assert torch.allclose(latents, ours, atol=1e-5)


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("0*.png"))])


@pytest.mark.parametrize("steps", [1, 2])
def test_generate_samples_the_export_and_the_run_alike_at_1_and_2_steps(steps, exported, tbcm_run, tmp_path):
    outs = {}
    for name, model in (("export", exported), ("run", tbcm_run)):
        outs[name] = tmp_path / name
        done = cdmctl("generate", "a red cube", "a blue ball", "--model", str(model), "--steps", str(steps),
                      "-n", "2", "--batch-size", "3", "--out", str(outs[name]))  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    image = Image.open(sorted(outs["export"].glob("0*.png"))[0])
    assert image.text["sampler"] == "consistency" and int(image.text["steps"]) == steps
    assert np.abs(pixels(outs["export"]) - pixels(outs["run"])).max() <= 1


def test_consistency_samples_depend_only_on_their_seed_not_the_batch(exported: Path):
    from cdmctl.generate import open_model

    student = open_model(str(exported), device="cpu")
    assert student.sampler == "consistency"
    prompts, seeds = ["a red cube", "a blue ball", "a tree"], [4, 5, 6]
    alone = [student.sample([p], [s], steps=2, batch_size=1)[0] for p, s in zip(prompts, seeds)]
    together = student.sample(prompts, seeds, steps=2, batch_size=3)
    other = student.sample(prompts, [7, 5, 6], steps=2, batch_size=3)

    def px(images):
        return np.stack([np.asarray(i, dtype=np.int16) for i in images])

    assert np.abs(px(alone) - px(together)).max() <= 1
    assert np.abs(px(other)[0] - px(together)[0]).max() > 1 and np.abs(px(other)[1:] - px(together)[1:]).max() <= 1
    # the teacher beside a consistency student samples deterministically (its scheduler without stochastic_sampling)
    from cdmctl.generate import sample_teacher

    torch.manual_seed(0)
    first = sample_teacher(student, prompts[:1], seeds[:1], steps=4, guidance=2.0)
    torch.manual_seed(1)
    second = sample_teacher(student, prompts[:1], seeds[:1], steps=4, guidance=2.0)
    assert np.array_equal(px(first), px(second))


@pytest.mark.parametrize("jvp", ["autograd", "finite-difference"])
def test_two_process_ddp_tbcm_run_completes_with_either_jvp(jvp, tiny_sd3_dir: Path, prompts: Path, tmp_path: Path):
    """torchrun, 2 CPU processes (gloo DDP): torch.func.jvp on the unwrapped student, or the difference through DDP."""
    out = tmp_path / "ddp"
    cmd = ["torchrun", "--nproc_per_node", "2", "-m", "cdmctl.cli", "distill", "--preset", "sd3-tbcm", "--out", str(out),
           "--plain", *tiny_tbcm(tiny_sd3_dir, prompts, 2), "--set", f"method.tbcm.jvp={jvp}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done 2 iterations") == 1
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["student_step"] == 2 and last["cost/student_fwd"] == (ROUTE - 1) * BATCH // 2  # per process


def torchrun(out: Path, args: list[str]) -> subprocess.CompletedProcess:
    launch = [str(Path(CDMCTL).parent / "torchrun"), "--nproc_per_node", "2", "-m", "cdmctl.cli"]
    cmd = [*launch, "distill", "--preset", "sd3-tbcm", "--out", str(out), "--plain", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_fsdp2_tbcm_shards_the_head_resumes_exactly_and_matches_one_process(tbcm_run: Path, tiny_sd3_dir: Path,
                                                                           prompts: Path, tmp_path: Path):  # fmt: skip
    """torchrun, 2 CPU processes, parallel.strategy fsdp2: the student and the log-variance head are sharded (each
    with its own optimizer), saved as torch distributed checkpoints and resumed to every tensor; torch.func.jvp
    works through FSDP2's hooks (torch 2.13) and matches the one-process run; the prompt cache is shared."""
    from tests.test_scale import RTOL, assert_identical, interrupted_copy, max_difference, moved

    fsdp = ["--set", "parallel.strategy=fsdp2", "--set", f"data.embedding_cache={tmp_path / 'cache'}"]
    fd = ["--set", "method.tbcm.jvp=finite-difference"]
    exact = torchrun(tmp_path / "exact", [*tiny_tbcm(tiny_sd3_dir, prompts, 4), *fsdp])  # the fixture's autograd JVP
    assert "encoded 3 prompts on 2 process(es)" in exact.stdout + exact.stderr
    assert exact.stdout.count("done 4 iterations") == 1
    a, one = list_checkpoints(tmp_path / "exact")[-1], list_checkpoints(tbcm_run)[-1]
    assert read_manifest(a)["parallel"] == {"strategy": "fsdp2", "processes": 2}
    state = {p.name for p in (a / "state").iterdir()}
    assert {"pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1"} <= state
    from torch.distributed.checkpoint import FileSystemReader

    head = FileSystemReader(str(a / "state" / "pytorch_model_fsdp_1")).read_metadata().state_dict_metadata
    assert {"model.linear.weight", "model.linear.bias"} <= head.keys()
    for which in ("student", "ema"):
        assert max_difference(a, one, which) <= RTOL * moved(one, tiny_sd3_dir), which
    last = json.loads((tmp_path / "exact" / "metrics.jsonl").read_text().splitlines()[-1])
    points = (ROUTE - 1) * BATCH // 2  # per process
    assert (last["cost/student_fwd"], last["cost/student_jvp_fwd"], last["cost/teacher_fwd"]) == (
        points, 3 * points, ROUTE * 2 * BATCH // 2)
    # the finite-difference JVP, interrupted and resumed: every tensor (student, head, both optimizers) as uninterrupted
    whole = torchrun(tmp_path / "whole", [*tiny_tbcm(tiny_sd3_dir, prompts, 4), *fsdp, *fd])
    assert "reused the cache of 3 prompts" in whole.stdout + whole.stderr
    split = interrupted_copy(tmp_path / "whole", tmp_path / "split")  # as a run stopped after checkpoint 2 leaves it
    torchrun(split, [*tiny_tbcm(tiny_sd3_dir, prompts, 4), *fsdp, *fd, "--resume"])
    b, c = list_checkpoints(tmp_path / "whole")[-1], list_checkpoints(tmp_path / "split")[-1]
    assert_identical(b, c, tmp_path)
    assert read_manifest(b)["cost_totals"] == read_manifest(c)["cost_totals"]
    assert max_difference(b, a, "student") > 0  # the two JVPs are two computations (and both trained)
