"""torchrun / DistributedDataParallel set-up. Without torchrun's environment everything is one process."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init_distributed(device_name):
    """Starts the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); picks the device."""
    device = torch.device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_sum(tensor, ctx):
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def finish(ctx):
    """Waits for every process before a run that succeeded ends, so that no process tears the group down while
    another still talks to it (not after an error: the others would wait for one that is gone)."""
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(model, ctx):
    """Gives every process rank 0's buffers (BatchNorm statistics), so that all evaluate the same model."""
    if ctx.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
