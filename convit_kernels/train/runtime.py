"""Where a run executes: its device, its process group under torchrun, and which process speaks.

One process or many: under torchrun (WORLD_SIZE > 1) every process trains a
DistributedDataParallel replica on its DistributedSampler shard, NCCL on GPUs,
gloo on CPU. Only rank 0 prints, logs and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: str = "cpu") -> Runtime:
        """One process on one device, outside any process group."""
        return cls(torch.device(device), rank=0, world_size=1, local_rank=0)


def setup_runtime(config) -> Runtime:
    """Pick the device, join the process group under torchrun, and size the CPU thread pool."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and config.device != "cpu"
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        # The processes of one machine share its cores; oversubscribing them slows every process down.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, store=attempt_store(rank, world_size), rank=rank, world_size=world_size)
    return Runtime(device, rank, world_size, local_rank)


def attempt_store(rank: int, world_size: int):
    """The rendezvous store under a prefix of torchrun's attempt; None (init's own env:// store) outside torchrun.

    torchrun's agent store outlives a restart (--max-restarts): without the prefix the new attempt's ranks can
    read the dead ranks' gloo addresses ("connection refused") or their barrier counts.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank, world_size))
    return dist.PrefixStore(f"convit_kernels/attempt_{attempt}", store)


def print_main(runtime: Runtime, *args) -> None:
    if runtime.is_main:
        print(*args, flush=True)


def synchronize(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
