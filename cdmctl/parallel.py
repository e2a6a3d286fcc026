"""How the processes of a run share it: one process, DDP or FSDP2, all through accelerate.

`effective_strategy` reads the preset and the launch environment (it needs no torch), `check_supported` refuses
what a strategy cannot combine with, `build_accelerator` makes the Accelerator, `prepare_networks` (and, for any
set of trained modules, `prepare_trained` with `place_teacher`) hands the trained modules and their optimizers to
accelerate and shards or places the frozen teacher. Sharding is accelerate's FSDP2 (`fully_shard` per
transformer block named by the backbone's `block_classes`); checkpoints of sharded runs are torch distributed
checkpoints written by accelerate. `handover` gives the other ranks rank 0's weights (`parallel.load rank0`): whole
under DDP (`receive_weights`), shard by shard under FSDP2 (`HostWeights`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cdmctl.errors import UserError

SINGLE, DDP, FSDP2 = "single", "ddp", "fsdp2"


def accelerate_wants_fsdp(env: Mapping[str, str]) -> bool:
    """`accelerate launch` with a config whose distributed_type is FSDP exports ACCELERATE_USE_FSDP=true."""
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def effective_strategy(setting: str, env: Mapping[str, str] | None = None) -> str:
    """'single', 'ddp' or 'fsdp2': what `parallel.strategy` means under this launch (no torch needed)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    wants_fsdp = accelerate_wants_fsdp(env)
    if wants_fsdp and env.get("FSDP_VERSION", "1") != "2":
        raise UserError("accelerate's config asks for FSDP version 1; cdmctl shards with FSDP2",
                        "set fsdp_version: 2 in the accelerate config (see launch/fsdp2-1node.yaml)")  # fmt: skip
    if wants_fsdp and setting == "ddp":
        raise UserError("parallel.strategy is ddp, but accelerate's config asks for FSDP",
                        "set parallel.strategy to fsdp2 or auto, or launch with a DDP config")  # fmt: skip
    if world == 1:
        if setting == FSDP2:
            raise UserError("parallel.strategy fsdp2 needs several processes, this is one",
                            "launch with accelerate launch --num_processes N (or torchrun), or use auto")  # fmt: skip
        return SINGLE
    return FSDP2 if setting == FSDP2 or (setting == "auto" and wants_fsdp) else DDP


def check_supported(preset: Any, strategy: str) -> None:
    """What FSDP2 cannot combine with: bitsandbytes' 8-bit optimizers step plain tensors, not sharded ones; an
    offloaded teacher is whole, not sharded."""
    if strategy == FSDP2 and preset.optim.optimizer != "adamw":
        raise UserError(f"optim.optimizer {preset.optim.optimizer} does not work with FSDP2 (bitsandbytes' 8-bit "
                        "states are not sharded)", "set optim.optimizer to adamw (FSDP2 shards its states already), "
                        "or parallel.strategy to ddp")  # fmt: skip
    if strategy == FSDP2 and preset.model.teacher_device == "cpu" and preset.parallel.teacher == "shard":
        raise UserError("model.teacher_device cpu offloads a whole teacher, but parallel.teacher shard shards it",
                        "set parallel.teacher to replicate (each rank offloads its own copy), or "
                        "model.teacher_device to accelerator")  # fmt: skip


def mixed_precision(precision: str) -> str:
    """bf16/fp16 autocast where the device supports it; float32 elsewhere (e.g. the CPU demo)."""
    import torch

    if precision == "fp32" or not torch.cuda.is_available():
        return "no"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return precision


def fsdp2_plugin(mixed: str) -> Any:
    """accelerate's FSDP2 plugin as cdmctl needs it; what is left open (resharding after forward, CPU offload,
    prefetching) comes from accelerate's config. The blocks to wrap are set once the backbone is loaded."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    # float32 masters, compute in bf16, gradients reduced in float32 (accelerate's default reduces in bf16)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else None
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="SHARDED_STATE_DICT",  # each rank writes its shard: torch distributed checkpoint
        mixed_precision_policy=policy,
        activation_checkpointing=False,  # the preset's model.gradient_checkpointing does it, inside each block
        # every rank loads the weights itself: the LoRA trees share tensors, which a move to `meta` would break
        cpu_ram_efficient_loading=False,
        sync_module_states=False,
    )


def build_accelerator(preset: Any, folder: Path, strategy: str, trackers: list[str] | None = None) -> Any:
    """The run's Accelerator; `trackers` (accelerate's names, checked installed) log under RUN/trackers."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # several processes without CUDA (torchrun on CPU): accelerate needs cpu=True to form a gloo group
    cpu = not torch.cuda.is_available() and strategy != SINGLE
    mixed = mixed_precision(preset.model.precision)
    plugin = fsdp2_plugin(mixed) if strategy == FSDP2 else None
    project = ProjectConfiguration(project_dir=str(folder), logging_dir=str(Path(folder) / "trackers"))
    acc = Accelerator(cpu=cpu, mixed_precision=mixed, fsdp_plugin=plugin, kwargs_handlers=[collective_timeout(preset)],
                      project_config=project, log_with=trackers or None)  # fmt: skip
    if plugin is not None and not acc.is_fsdp2:
        enable_fsdp2_on_cpu(acc, plugin)
    return acc


def collective_timeout(preset: Any) -> Any:
    """parallel.timeout_s for every collective: a rank whose peer hangs or died stops after it, never waits on."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=preset.parallel.timeout_s))


LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
             "nccl", "gloo", "watchdog")  # fmt: skip


def lost_a_peer(exc: BaseException) -> bool:
    """A collective failed because another process died, hung or raised (gloo/NCCL say so in a RuntimeError or
    torch's DistError), as opposed to this process's own failure."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in LOST_PEER)


def enable_fsdp2_on_cpu(acc: Any, plugin: Any) -> None:
    """accelerate turns FSDP on only for accelerator devices and silently runs DDP on CPU. torch's FSDP2 works on
    a gloo group, so a CPU launch (the tests, a smoke run) switches accelerate's state to its FSDP path; from here
    on, preparing, clipping, saving and loading are accelerate's own FSDP2 code, exactly as on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if acc.device.type != "cpu":
        raise UserError(f"accelerate did not enable FSDP on {acc.device}", "check the accelerate config")
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState copies it back
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin


def wrap_blocks(acc: Any, block_classes: list[type]) -> None:
    """FSDP2 shards each of these blocks as one unit (and the rest of the model as the root)."""
    if acc.is_fsdp2:
        acc.state.fsdp_plugin.transformer_cls_names_to_wrap = sorted({c.__name__ for c in block_classes})


def prepare_networks(acc: Any, teacher_mode: str, student, teacher, fake, student_opt, fake_opt,
                     teacher_device: str = "accelerator", weights: "HostWeights | None" = None):  # fmt: skip
    """The networks and optimizers through accelerate: DDP-wrapped, or FSDP2-sharded (accelerate's FSDP2 takes
    one model with its optimizer per call); the frozen teacher is sharded too, replicated on every rank, or
    offloaded to host memory. `weights` (a sharded rank-0 load, `handover`) fills each tree once it is sharded."""
    pairs = [(student, student_opt), (fake, fake_opt)]
    (student, student_opt), (fake, fake_opt) = prepare_trained(acc, pairs, weights)
    teacher = place_teacher(acc, teacher_mode, teacher, teacher_device, weights)
    return student, teacher, fake, student_opt, fake_opt


def prepare_trained(acc: Any, pairs: list[tuple[Any, Any]],
                    weights: "HostWeights | None" = None) -> list[tuple[Any, Any]]:  # fmt: skip
    """Trained (module, its optimizer) pairs through accelerate, in this order (the order of the checkpoint's
    models and optimizers): one `prepare` call for DDP, one per pair under FSDP2 (each module filled by `weights`
    once sharded). A module without any of the backbone's blocks (TBCM's log-variance head) is sharded as one unit
    (accelerate refuses block names the module lacks)."""
    if not acc.is_fsdp2:
        prepared = acc.prepare(*[m for m, _ in pairs], *[o for _, o in pairs])
        n = len(pairs)
        return list(zip(prepared[:n], prepared[n:]))
    plugin = acc.state.fsdp_plugin
    blocks = plugin.transformer_cls_names_to_wrap
    out = []
    for module, optimizer in pairs:
        if blocks is not None:
            present = {type(m).__name__ for m in module.modules()}
            plugin.transformer_cls_names_to_wrap = [n for n in blocks if n in present]
        try:
            module, optimizer = acc.prepare(module, optimizer)
        finally:
            plugin.transformer_cls_names_to_wrap = blocks
        out.append((filled(weights, acc, module), optimizer))
    return out


def place_teacher(acc: Any, teacher_mode: str, teacher, teacher_device: str = "accelerator",
                  weights: "HostWeights | None" = None):  # fmt: skip
    """The frozen teacher on this rank's device: whole, sharded under FSDP2 with `parallel.teacher shard`, or in
    host memory (`model.teacher_device cpu`). `weights` fills a whole teacher before it is placed, a sharded one
    after."""
    if teacher_device == "cpu":
        return offload_frozen(filled(weights, acc, teacher, "cpu"), acc.device)
    if acc.is_fsdp2 and teacher_mode == "shard":
        return filled(weights, acc, shard_frozen(acc, teacher))
    return filled(weights, acc, teacher, acc.device).to(acc.device)


def offload_frozen(module, device):
    """diffusers' group offloading of a frozen module: its weights live in host memory, each transformer block (each
    ModuleList entry) is copied to `device` for its forward and dropped after; on CUDA a side stream copies the next
    block while the current one computes."""
    import torch
    from diffusers.hooks import apply_group_offloading

    cuda = torch.device(device).type == "cuda"
    apply_group_offloading(module.to("cpu"), onload_device=device, offload_device="cpu", offload_type="block_level",
                           num_blocks_per_group=1, use_stream=cuda, non_blocking=cuda)  # fmt: skip
    return module


def shard_frozen(acc: Any, module):
    """FSDP2 over a frozen module, by accelerate's own function, without registering it for checkpoints (it
    never changes, so save_state need not write it)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    on_meta = any(t.is_meta for t in (*module.parameters(), *module.buffers()))  # filled once sharded
    return fsdp2_prepare_model(acc, module if on_meta else module.to(acc.device))


def grad_clipper(acc: Any):
    """`clip(parameters, max_norm) -> total norm` for the engine. Under FSDP2 this is what accelerate's own
    clip_grad_norm_ does for one model (unscale, then torch's DTensor-aware clipping); accelerate's entry point
    itself cannot be used with two sharded models: it looks the parameters up by comparing tensors with `==`."""
    if not acc.is_fsdp2:
        return acc.clip_grad_norm_

    def clip(parameters, max_norm: float):
        import torch

        from cdmctl.engine.sharding import is_sharded

        acc.unscale_gradients()
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return norm.full_tensor() if is_sharded(norm) else norm

    return clip


def receive_weights(acc: Any, modules: list[Any]) -> None:
    """Rank 0's weights into every other rank's copies of `modules` (module trees that may share tensors), over the
    process group: a rank that loaded its transformer on `meta` (`transformer_on_meta`) gets it here, straight into
    its device memory, without reading the files or holding them in host memory. Every parameter and buffer is
    replaced on the receiving ranks by one new tensor shaped and typed as rank 0's, and that same tensor goes into
    every tree that held the old one: tensors the trees shared (a LoRA run's frozen base) stay shared."""
    import torch
    import torch.distributed as dist

    if acc.num_processes == 1:
        return
    tensors = distinct_tensors(modules)
    layout = [[(tuple(t.shape), t.dtype) for t in tensors] if acc.is_main_process else None]
    dist.broadcast_object_list(layout, src=0)
    if [tuple(t.shape) for t in tensors] != [shape for shape, _ in layout[0]]:
        raise RuntimeError("the networks of this rank differ in their tensors from rank 0's; cannot receive weights")
    if not acc.is_main_process:
        fresh = {id(t): renewed(t, dtype, acc.device) for t, (_, dtype) in zip(tensors, layout[0])}
        replace_tensors(modules, fresh)
        tensors = [fresh[id(t)] for t in tensors]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def distinct_tensors(modules: list[Any]) -> list[Any]:
    """Every parameter and buffer of the trees, each once, in the same order on every rank (the trees' own order)."""
    seen, out = set(), []
    for module in modules:
        for sub in module.modules() if module is not None else ():
            for t in (*sub._parameters.values(), *sub._buffers.values()):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
    return out


def renewed(t: Any, dtype: Any, device: Any) -> Any:
    """An uninitialised tensor like `t` (a parameter stays a parameter, trainable or not) in `dtype` on `device`."""
    import torch

    data = torch.empty(t.shape, dtype=dtype, device=device)
    return torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else data


def replace_tensors(modules: list[Any], fresh: dict[int, Any]) -> None:
    """Put `fresh[id(old)]` wherever a tree holds `old`."""
    for module in modules:
        for sub in module.modules() if module is not None else ():
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    if t is not None and id(t) in fresh:
                        table[name] = fresh[id(t)]


def handover(acc: Any, load: str, modules: list[Any]) -> "HostWeights | None":
    """Rank 0's weights to the other ranks (`parallel.load rank0`), called before the optimizers take the parameters.
    Whole copies (DDP): received now (`receive_weights`). Sharded (FSDP2): rank 0 keeps its tensors in host memory
    and every rank's trees go to `meta`, to be filled shard by shard once sharded (`HostWeights.fill`): no device,
    and no rank but 0, ever holds a whole tree. None when there is nothing to hand over later."""
    if load != "rank0" or acc.num_processes == 1:
        return None
    if not acc.is_fsdp2:
        receive_weights(acc, modules)
        return None
    return HostWeights(acc, modules)


def filled(weights: "HostWeights | None", acc: Any, module, device: Any = None):
    """`module` with rank 0's weights (`HostWeights.fill`) when a sharded load hands them over, else as it is."""
    if weights is not None:
        weights.fill(acc, module, device)
    return module


class HostWeights:
    """Rank 0's tensors of module trees in host memory (other ranks: nothing), while the trees, on `meta` on every
    rank, are sharded; then filled tree by tree, one tensor at a time: rank 0 broadcasts it whole and each rank
    keeps its shard of a sharded parameter (the whole of a buffer or unsharded one)."""

    def __init__(self, acc: Any, modules: list[Any]):
        tensors = distinct_tensors(modules)
        index = {id(t): i for i, t in enumerate(tensors)}  # the same on every rank: the trees are built alike
        # per tree: name -> which distinct tensor; tensors the trees shared, whole, stay shared when filled
        self.names = {id(m): {n: index[id(t)] for n, t in named_tensors(m)} for m in modules if m is not None}
        self.host = [t.detach().cpu() for t in tensors] if acc.is_main_process else []
        self.whole: dict[int, Any] = {}  # distinct tensor -> the unsharded tensor it was filled into
        for module in modules:
            if module is not None:
                module.to("meta")

    def fill(self, acc: Any, module, device: Any = None) -> None:
        """Every tensor of `module` (a tree handed over, now sharded or not) from rank 0 (collective)."""
        import torch

        from cdmctl.engine.sharding import is_sharded, layout_of, split

        names = self.names.get(id(module))
        if names is None:  # not handed over (TBCM's log-variance head): its own weights
            return
        module.to_empty(device=device or acc.device)  # FSDP2 re-registers each shard's storage
        with torch.no_grad():
            for name, t in named_tensors(module):
                i = names[name]
                if not is_sharded(t) and i in self.whole:  # already filled, whole, into a tree before
                    set_tensor(module, name, self.whole[i])
                    continue
                whole = self.received(acc, t, i)
                if is_sharded(t):
                    t.to_local().copy_(split(whole, layout_of(t)))
                    continue
                if whole is not t:
                    t.copy_(whole)
                self.whole[i] = t

    def received(self, acc: Any, t: Any, i: int) -> Any:
        """Distinct tensor `i` whole, as rank 0 holds it, in `t`'s dtype on the communication device (broadcast
        straight into `t` when `t` is a whole tensor there)."""
        import torch
        import torch.distributed as dist

        from cdmctl.engine.sharding import is_sharded

        dtype, device = (t.to_local() if is_sharded(t) else t).dtype, acc.device
        into = not is_sharded(t) and t.is_contiguous() and t.device == torch.device(device)
        whole = t if into else torch.empty(t.shape, dtype=dtype, device=device)
        if acc.is_main_process:
            whole.copy_(self.host[i])
        dist.broadcast(whole, src=0)
        return whole


def named_tensors(module) -> list[tuple[str, Any]]:
    """Every parameter and buffer of a tree by its name (a tensor held under two names: its first)."""
    return [*module.named_parameters(), *module.named_buffers()]


def set_tensor(module, name: str, tensor: Any) -> None:
    """Put `tensor` at `name` (a parameter's or buffer's) in the tree."""
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner)
    table = sub._parameters if leaf in sub._parameters else sub._buffers
    table[leaf] = tensor
