"""Loading once for several ranks (parallel.load rank0): rank 1 builds the transformer on `meta` without reading its
files, receives rank 0's weights over the process group (2 CPU processes, torchrun + gloo), and ends with exactly the
tensors of a one-process load, with the LoRA trees' frozen base still one set of tensors; the frozen teacher of a
bf16 run has no float32 copy. Under FSDP2 the trees are sharded empty and filled shard by shard: every tree, gathered,
equals an every-rank load's, tensors are shared as there, and no tree on any rank ever holds more than its shard of
the transformer's parameters.

The worker half of this file runs under torchrun (`python -m tests.test_loading`): it builds the three networks as
`distill` does (the same functions, in the same order) and writes, per rank, a hash of every tensor of every tree and
which tensors the trees share.
"""

from __future__ import annotations

import contextlib
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
    from cdmctl.backbones.loading import parts_from_rank0, transformer_on_meta
    from cdmctl.config import load_preset
    from cdmctl.networks import build_networks
    from cdmctl.parallel import receive_weights

    preset = load_preset("sd3-4nfe", [f"model.pretrained={model}", f"model.train={train}", "model.lora.rank=4",
                                      "model.gradient_checkpointing=false", f"parallel.load={load}"])  # fmt: skip
    acc = Accelerator(cpu=True)
    once = preset.parallel.load == "rank0" and world > 1
    torch.manual_seed(0)  # LoRA's A is random: rank 0 draws it, as a one-process run does
    parts, parts_on_meta = [], []

    def receive(modules):  # as DistillRun's, noting what this rank had before it received
        parts.extend(modules)
        parts_on_meta.extend(any(p.is_meta for p in m.parameters()) for m in modules)
        receive_weights(acc, modules)

    others = parts_from_rank0(receive, empty=not acc.is_main_process) if once else contextlib.nullcontext()
    with transformer_on_meta(once and not acc.is_main_process), others:
        backbone = load_backbone("sd3", str(model), dtype=torch.bfloat16, device=acc.device)
    started_on_meta = [any(p.is_meta for p in backbone.transformer.parameters()), *parts_on_meta]
    parts = parts or [*backbone._text.values(), backbone.vae]  # one process, or every rank reading the files
    student, teacher, fake = build_networks(backbone, preset, torch.bfloat16)
    if load == "rank0":  # as DistillRun: every-rank loads leave each rank's own weights
        receive_weights(acc, [student, teacher, fake])
    trees = dict(zip(TREES, (student, teacher, fake)))
    for m in parts:  # by class, in the pipeline's order (the two CLIP encoders)
        trees[f"{type(m).__name__}{sum(type(o) is type(m) for o in trees.values())}"] = m
    return describe(trees), started_on_meta


def stored(t: torch.Tensor) -> int:
    """Bytes of the storage a parameter holds on this rank (a shard's padded storage; nothing on meta)."""
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return 0 if local.is_meta else local.untyped_storage().nbytes()


def held_at_every_broadcast(trees: dict[str, torch.nn.Module]) -> dict[str, int]:
    """From now on, at every broadcast of this process: the largest parameter storage each tree held (as a dict that
    fills while the process runs)."""
    import torch.distributed as dist

    peak = dict.fromkeys(trees, 0)
    real = dist.broadcast

    def spy(*args, **kwargs):
        for tree, module in trees.items():
            peak[tree] = max(peak[tree], sum(stored(p) for p in module.parameters()))
        return real(*args, **kwargs)

    dist.broadcast = spy
    return peak


def gathered_description(trees: dict[str, torch.nn.Module]) -> dict:
    """`describe` of sharded trees: every tensor gathered whole (collective, the same order on every rank), and which
    parameter and which buffer objects the trees share."""
    from torch.distributed.tensor import DTensor

    hashes, holders = {}, {"parameters": {}, "buffers": {}}
    for tree, module in trees.items():
        for kind, named in (("parameters", module.named_parameters(remove_duplicate=False)),
                            ("buffers", module.named_buffers(remove_duplicate=False))):  # fmt: skip
            for name, t in named:
                hashes[f"{tree}/{name}"] = digest(t.full_tensor() if isinstance(t, DTensor) else t)
                holders[kind].setdefault(id(t), []).append(f"{tree}/{name}")
    shared = {kind: sorted(sorted(v) for v in by.values() if len(v) > 1) for kind, by in holders.items()}
    return {"hashes": hashes, "shared": shared}


def build_sharded(model: Path, train: str, load: str, out: Path) -> dict:
    """The networks as DistillRun builds them under FSDP2 (the frozen teacher sharded too), float32 on the CPU:
    their gathered description and, per tree, the whole parameter bytes and the most this rank held."""
    from cdmctl.backbones import load_backbone
    from cdmctl.backbones.loading import transformer_at, transformer_placement
    from cdmctl.config import load_preset
    from cdmctl.networks import adamw, build_networks
    from cdmctl.parallel import FSDP2, build_accelerator, handover, prepare_networks, wrap_blocks

    preset = load_preset("sd3-4nfe", [f"model.pretrained={model}", f"model.train={train}", "model.lora.rank=4",
                                      "model.gradient_checkpointing=false", f"parallel.load={load}",
                                      "model.precision=fp32", "parallel.strategy=fsdp2"])  # fmt: skip
    acc = build_accelerator(preset, out / train, FSDP2)
    with transformer_at(transformer_placement(load == "rank0", acc.is_main_process, acc.is_fsdp2)):
        backbone = load_backbone("sd3", str(model), dtype=torch.float32, device=acc.device)
    on_meta = any(p.is_meta for p in backbone.transformer.parameters())
    wrap_blocks(acc, backbone.block_classes())
    torch.manual_seed(0)
    trees = dict(zip(TREES, build_networks(backbone, preset, torch.float32)))
    whole = {tree: sum(p.numel() * p.element_size() for p in m.parameters()) for tree, m in trees.items()}
    built = {tree: sum(stored(p) for p in m.parameters()) for tree, m in trees.items()}  # rank 0: whole, in host memory
    peak = held_at_every_broadcast(trees)
    weights = handover(acc, load, list(trees.values()))
    student, teacher, fake = trees.values()
    opts = adamw(student, 1e-3, preset), adamw(fake, 1e-3, preset)
    prepare_networks(acc, "shard", student, teacher, fake, *opts, preset.model.teacher_device, weights)
    for tree, module in trees.items():  # what each tree holds once loaded counts too
        peak[tree] = max(peak[tree], sum(stored(p) for p in module.parameters()))
    return {**gathered_description(trees), "whole": whole, "peak": dict(peak), "built": built, "on_meta": on_meta}


def worker() -> None:
    model, train, load, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if load.startswith("fsdp2-"):  # every tree under FSDP2, the trainings given as "full,lora" in one launch
        found = {t: build_sharded(model, t, load.removeprefix("fsdp2-"), out) for t in train.split(",")}
    else:
        description, on_meta = build(model, train, load, world)
        found = {**description, "started_on_meta": on_meta}
    (out / f"rank{rank}.json").write_text(json.dumps(found))
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
    # rank 1 never read the weights: the transformer, the three text encoders and the VAE all started on meta
    assert [r["started_on_meta"] for r in ranks] == [[False] * 5, [True] * 5]
    for rank in ranks:
        assert rank["hashes"] == one["hashes"]  # every tensor of every tree, bit for bit
        assert rank["shared"] == one["shared"]  # the same tensors shared between the same names
    if train == "lora":  # the frozen base: one tensor held by the student, the teacher and the fake teacher
        triples = [names for names in one["shared"] if {n.split("/")[0] for n in names} == set(TREES)]
        assert len(triples) > 10
    else:  # full copies share nothing; T5's tied embeddings stay one tensor on the receiving rank too
        assert one["shared"] == [["T5EncoderModel0/encoder.embed_tokens.weight", "T5EncoderModel0/shared.weight"]]


def test_every_rank_reading_the_files_itself_is_still_there(tiny_sd3_dir, tmp_path, one_process):
    one = one_process("lora")
    ranks = launch(tiny_sd3_dir, "lora", "every-rank", tmp_path / "two", 2)
    assert [r["started_on_meta"] for r in ranks] == [[False], [False]]
    assert all(r["hashes"] == one["hashes"] and r["shared"] == one["shared"] for r in ranks)


@pytest.fixture(scope="module")
def every_rank_fsdp2(tiny_sd3_dir, tmp_path_factory) -> list[dict]:
    """Both trainings under FSDP2 with every rank reading the files itself: the full load to compare with."""
    return launch(tiny_sd3_dir, "full,lora", "fsdp2-every-rank", tmp_path_factory.mktemp("fsdp2-every"), 2)


def test_under_fsdp2_no_rank_holds_a_whole_tree_and_every_tree_equals_a_full_load(tiny_sd3_dir, tmp_path,
                                                                                  every_rank_fsdp2):  # fmt: skip
    ranks = launch(tiny_sd3_dir, "full,lora", "fsdp2-rank0", tmp_path / "two", 2)
    for train in ("full", "lora"):
        full = every_rank_fsdp2[0][train]
        for rank in (*ranks, *every_rank_fsdp2):
            assert rank[train]["hashes"] == full["hashes"]  # every tensor of every tree, gathered, bit for bit
            # sharded, each tree has its own shards of the frozen base, as in a full load (none shared); a buffer
            # the trees shared before sharding stays shared (an every-rank load shares it between fewer trees)
            assert rank[train]["shared"]["parameters"] == full["shared"]["parameters"] == []
            groups = [set(g) for g in rank[train]["shared"]["buffers"]]
            assert all(any(set(g) <= h for h in groups) for g in full["shared"]["buffers"])
        assert [r[train]["on_meta"] for r in ranks] == [False, True]  # rank 1 never read the transformer's files
        assert set(ranks[1][train]["built"].values()) == {0}  # nor built any network's parameters for real
        for r, rank in enumerate(ranks):
            for tree, whole in rank[train]["whole"].items():
                held = rank[train]["peak"][tree]
                print(f"{train} rank {r} {tree}: held at most {held} of {whole} bytes")
                assert 0 < held <= 0.6 * whole, (train, r, tree)  # its shard (half, padded), never the whole tree
    # the three LoRA trees share their buffers (position tables), as before sharding
    assert any({n.split("/")[0] for n in names} == set(TREES) for names in ranks[1]["lora"]["shared"]["buffers"])


if __name__ == "__main__":
    worker()
