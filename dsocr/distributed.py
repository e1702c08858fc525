"""What this pipeline needs to know about a multi-process run: who am I, agree on a value, gather results.

The processes are started by an existing launcher (``torchrun``, ``accelerate launch``, ``deepspeed``) and
the process group is created by the HF Trainer (through accelerate): gloo on CPU (``training.use_cpu``),
NCCL on GPUs. Nothing here starts processes or builds a group; every helper is the identity in a
single-process run, so the same code path serves both.

* ``agree_max``: one ``all_reduce(MAX)`` of a small integer, used for the stop signal (a SIGTERM that
  reached one rank must stop every rank at the same step, or the checkpoint barrier waits forever).
* ``gather_objects``: every rank's picklable result, in rank order (sharded evaluation).
* ``barrier``: all ranks here before rank 0 reads what every rank wrote (e.g. the skipped-records log).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def is_distributed() -> bool:
    """A process group with more than one process is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group; the launcher's ``RANK`` before it exists)."""
    if is_distributed():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes (1 without a process group; the launcher's ``WORLD_SIZE`` before it exists)."""
    if is_distributed():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


_CPU_GROUP: dict[str, Any] = {}


def _cpu_group():
    """A gloo group over the same ranks: host values are agreed without touching (and syncing) the GPUs.

    With NCCL, an all_reduce of a flag needs a CUDA tensor and a ``.item()``, i.e. a full device sync at
    every step end; over gloo it is a host-side exchange while the GPU keeps running queued work.
    Created on first use, which every rank reaches in the same order (groups are made collectively).
    """
    if torch.distributed.get_backend() == "gloo":
        return None  # the default group already is one
    if "group" not in _CPU_GROUP:
        _CPU_GROUP["group"] = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUP["group"]


def agree_max(value: int) -> int:
    """The largest ``value`` over all ranks (every rank gets the same answer); ``value`` alone in one process."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=_cpu_group())
    return int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj, group=_cpu_group())
    return out


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        torch.distributed.barrier(group=_cpu_group())


def deepspeed_stage(args) -> int | None:
    """ZeRO stage of ``training.deepspeed`` (a JSON file or a dict), None without DeepSpeed."""
    spec = getattr(args, "deepspeed", None)
    if not spec:
        return None
    if isinstance(spec, str):
        import json

        with open(spec, encoding="utf-8") as f:
            spec = json.load(f)
    return int(spec.get("zero_optimization", {}).get("stage", 0))


def launch_record(args) -> dict:
    """How this run is launched, as saved in every checkpoint's ``launch.json`` and checked on resume."""
    world = max(int(args.world_size), 1)
    return {
        "world_size": world,
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        "deepspeed": deepspeed_stage(args),
    }


def mark_moe_leaves(model) -> list[str]:
    """Under ZeRO-3, gather each MoE block's weights as one unit (DeepSpeed's leaf modules).

    ZeRO-3 gathers a module's partitioned weights in a forward hook and expects every rank to run the
    same modules in the same order. An expert that received no token on one rank is skipped there, so
    that rank never joins the gather the others wait in: a hang. Marked as a leaf, the whole MoE block
    (router, every expert, shared experts) is gathered on entry on every rank, whatever the routing.
    Returns the marked class names (empty without DeepSpeed or without MoE blocks).
    """
    classes = sorted({type(m) for m in model.modules() if type(m).__name__.lower().endswith("moe")},
                     key=lambda c: c.__name__)
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]
