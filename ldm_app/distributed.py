"""Which distributed setup accelerate actually runs, checked against what was asked for.

accelerate falls back silently: `accelerate launch --config_file fsdp.yaml` with `ACCELERATE_USE_CPU=true` runs plain
multi-CPU DDP, and FSDP or DeepSpeed on a single process runs no sharding at all. A run that believes it is sharded
but is not writes checkpoints of another layout and needs other memory, so the trainer refuses such a run.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env
from accelerate.utils.environment import get_int_from_env

# what `accelerate launch` sets in the environment when its config or flags ask for a sharded run
REQUESTS = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}


def distributed_type(accelerator: Accelerator) -> str:
    """accelerate's name for the setup it runs: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, …"""
    return accelerator.distributed_type.value


def describe(accelerator: Accelerator) -> str:
    """One line for the log: the setup, the processes and the device, e.g. `FSDP (v2) on 8 processes, cuda:0`."""
    kind = distributed_type(accelerator)
    if kind == "FSDP":
        kind += f" (v{accelerator.state.fsdp_plugin.fsdp_version})"
    return f"{kind} on {accelerator.num_processes} process{'es' * (accelerator.num_processes > 1)}, " \
           f"{accelerator.device}"


def check_distributed(accelerator: Accelerator, required: str | None) -> str:
    """The distributed type accelerate runs; a ValueError when it is not the one asked for, either by the
    config (`required`, e.g. train.distributed_type=FSDP) or by `accelerate launch` (ACCELERATE_USE_FSDP=true)."""
    running = distributed_type(accelerator)
    known = [kind.value for kind in DistributedType]
    if required is not None:
        required = "NO" if required == "False" else required.upper()  # YAML reads an unquoted NO as false
        if required not in known:
            raise ValueError(f"train.distributed_type={required!r} is not one of accelerate's: {', '.join(known)} "
                             "(or null: whatever `accelerate launch` sets up).")
    asked = [(f"train.distributed_type={required}", required)] if required else []
    asked += [(f"{var}=true (from `accelerate launch`)", kind) for kind, var in REQUESTS.items()
              if parse_flag_from_env(var)]
    for source, kind in asked:
        if kind != running:
            raise ValueError(
                f"{source} asks for {kind}, but accelerate runs {running} on {accelerator.num_processes} process(es) "
                f"on {accelerator.device.type}: {_why(kind, accelerator)}")
    return running


def _why(kind: str, accelerator: Accelerator) -> str:
    """What to change so that accelerate runs `kind`."""
    if kind in REQUESTS and accelerator.device.type == "cpu":
        return (f"{kind} needs GPUs (with ACCELERATE_USE_CPU=true accelerate runs plain DDP instead); "
                "on CPUs, launch without the FSDP/DeepSpeed config.")
    if kind in REQUESTS and accelerator.num_processes == 1:
        return f"{kind} needs a distributed launch: `accelerate launch --config_file configs/accelerate/….yaml`."
    return f"launch it the way {kind} needs, or set train.distributed_type=null to accept what accelerate runs."


def check_launched(num_processes: int, command: str) -> None:
    """Refuse processes that were launched together but did not join one distributed run: each would act alone
    (and as the main process). `num_processes` is what accelerate set up; `command` is named in the fix."""
    launched = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if launched != num_processes:
        raise ValueError(f"{launched} processes were launched but accelerate set up {num_processes}, so each would "
                         f"work alone. Without CUDA, start them with `ACCELERATE_USE_CPU=true torchrun --standalone "
                         f"--nproc_per_node {launched} {command}`; with GPUs, make CUDA visible to torch.")
