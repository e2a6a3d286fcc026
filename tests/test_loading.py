"""Loading once for several ranks (parallel.load rank0): rank 1 builds the transformer on `meta` without reading its
files, receives rank 0's weights over the process group (2 CPU processes, torchrun + gloo), and ends with exactly the
tensors of a one-process load, with the LoRA trees' frozen base still one set of tensors; the frozen teacher of a
bf16 run has no float32 copy.

The worker half of this file runs under torchrun (`python -m tests.test_loading`): it builds the three networks as
`distill` does (the same functions, in the same order) and writes, per rank, a hash of every tensor of every tree and
which tensors the trees share.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_run_folder import CDMCTL

ROOT = Path(__file__).resolve().parents[1]
TREES = ("student", "teacher", "fake")


def digest(t: torch.Tensor) -> str:
    """The tensor's dtype, shape and bytes, hashed."""
    data = t.detach().contiguous().cpu()
    raw = data.view(torch.uint8) if data.dtype == torch.bfloat16 else data
    return hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode() + raw.numpy().tobytes()).hexdigest()


def describe(trees: dict[str, torch.nn.Module]) -> dict:
    """Every tensor of every tree hashed, by '<tree>/<name>', and, for each tensor held by several names, those
    names (the sharing structure; a tensor is identified by its storage)."""
    hashes, holders = {}, {}
    for tree, module in trees.items():
        named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
        for name, t in named:
            hashes[f"{tree}/{name}"] = digest(t)
            holders.setdefault(t.data_ptr(), []).append(f"{tree}/{name}")
    return {"hashes": hashes, "shared": sorted(sorted(v) for v in holders.values() if len(v) > 1)}


def build(model: Path, train: str, load: str, world: int) -> tuple[dict, bool]:
    """The networks as DistillRun builds them on this process: (their description, whether the transformer was
    built on meta)."""
    from accelerate import Accelerator

    from cdmctl.backbones import load_backbone
    from cdmctl.backbones.loading import transformer_on_meta
    from cdmctl.config import load_preset
    from cdmctl.networks import build_networks
    from cdmctl.parallel import receive_weights

    preset = load_preset("sd3-4nfe", [f"model.pretrained={model}", f"model.train={train}", "model.lora.rank=4",
                                      "model.gradient_checkpointing=false", f"parallel.load={load}"])  # fmt: skip
    acc = Accelerator(cpu=True)
    empty = preset.parallel.load == "rank0" and world > 1 and not acc.is_main_process
    torch.manual_seed(0)  # LoRA's A is random: rank 0 draws it, as a one-process run does
    with transformer_on_meta(empty):
        backbone = load_backbone("sd3", str(model), dtype=torch.bfloat16, device=acc.device)
    started_on_meta = any(p.is_meta for p in backbone.transformer.parameters())
    student, teacher, fake = build_networks(backbone, preset, torch.bfloat16)
    if load == "rank0":  # as DistillRun: every-rank loads leave each rank's own weights
        receive_weights(acc, [student, teacher, fake])
    return describe(dict(zip(TREES, (student, teacher, fake)))), started_on_meta


def worker() -> None:
    model, train, load, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    description, on_meta = build(model, train, load, world)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps({**description, "started_on_meta": on_meta}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def launch(model: Path, train: str, load: str, out: Path, processes: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-m", "tests.test_loading", str(model), train, load, str(out)]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(CDMCTL).parent / "torchrun"), "--nproc_per_node", str(processes), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.fixture(scope="module")
def one_process(tiny_sd3_dir, tmp_path_factory):
    """train -> the networks of a one-process load (which never starts on meta), launched once per module."""
    done = {}

    def get(train: str) -> dict:
        if train not in done:
            (done[train],) = launch(tiny_sd3_dir, train, "rank0", tmp_path_factory.mktemp(f"one-{train}"), 1)
        return done[train]

    return get


@pytest.mark.parametrize("train", ["full", "lora"])
def test_a_rank_that_starts_on_meta_ends_with_exactly_the_weights_of_a_full_load(tiny_sd3_dir, tmp_path, train,
                                                                                 one_process):  # fmt: skip
    one = one_process(train)
    ranks = launch(tiny_sd3_dir, train, "rank0", tmp_path / "two", 2)
    assert [r["started_on_meta"] for r in ranks] == [False, True]  # rank 1 never read the weights
    for rank in ranks:
        assert rank["hashes"] == one["hashes"]  # every tensor of every tree, bit for bit
        assert rank["shared"] == one["shared"]  # the same tensors shared between the same names
    if train == "lora":  # the frozen base: one tensor held by the student, the teacher and the fake teacher
        triples = [names for names in one["shared"] if {n.split("/")[0] for n in names} == set(TREES)]
        assert len(triples) > 10
    else:
        assert not one["shared"]


def test_every_rank_reading_the_files_itself_is_still_there(tiny_sd3_dir, tmp_path, one_process):
    one = one_process("lora")
    ranks = launch(tiny_sd3_dir, "lora", "every-rank", tmp_path / "two", 2)
    assert [r["started_on_meta"] for r in ranks] == [False, False]
    assert all(r["hashes"] == one["hashes"] and r["shared"] == one["shared"] for r in ranks)


if __name__ == "__main__":
    worker()
