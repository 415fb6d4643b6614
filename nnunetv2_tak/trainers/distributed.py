"""Training under torchrun (any number of nodes) and clean stops on batch-system preemption.

nnU-Net's own DDP (``nnUNetv2_train -num_gpus N``) spawns N processes on one machine and uses the
global rank as the CUDA device index. Under torchrun every process has a global rank (``RANK``, over
all nodes) and a local rank (``LOCAL_RANK``, on its node). Here:

- the process group comes from the torchrun environment (``env://``: MASTER_ADDR, MASTER_PORT, RANK,
  WORLD_SIZE), backend nccl on CUDA and gloo on CPU (:func:`launch_from_environment`);
- :class:`DistributedTrainerMixin` (a base of nnUNetTrainerTAK) puts each process on ``cuda:LOCAL_RANK``
  (or the CPU) and wraps the network in DDP on that device; everything else stays nnU-Net's: the global
  batch split over global ranks (``_set_batch_size_and_oversample``), rank-0 logging and checkpoints,
  validation cases sharded over global ranks;
- SIGTERM/SIGUSR1 only set a flag (:class:`StopRequest`); after every iteration all ranks agree on it
  (all_reduce), rank 0 writes ``checkpoint_latest.pth`` and every process leaves with
  :data:`PREEMPTED_EXIT_CODE`. ``--c`` resumes: the interrupted epoch is run again from its start, with
  the weights it had reached.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, checkpoint written; rerun with --c
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
LATEST_CHECKPOINT = "checkpoint_latest.pth"
DATA_LOADER_ATTRIBUTES = ("dataloader_train", "dataloader_val", "dataloader_unlabeled")


class DistributedSetupError(RuntimeError):
    """The torchrun environment does not fit the requested device (e.g. more processes than GPUs on a node)."""


class TrainingStopped(Exception):
    """Raised out of ``run_training`` after a requested stop was checkpointed on every rank."""

    def __init__(self, signal_name: str, epoch: int, iterations_done: int | None, checkpoint: str | None):
        where = f"in epoch {epoch} after {iterations_done} iteration(s)" if iterations_done is not None \
            else f"before epoch {epoch}"
        saved = f"{checkpoint} written" if checkpoint else "checkpointing is disabled, nothing written"
        super().__init__(f"stopped by {signal_name} {where}; {saved}. Run the same command with --c to resume "
                         f"at epoch {epoch}.")
        self.signal_name = signal_name
        self.epoch = epoch
        self.iterations_done = iterations_done
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job."""

    rank: int  # global rank over all nodes (nnU-Net calls it local_rank)
    local_rank: int  # rank on this node: the CUDA device index
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def local_rank_from_environment() -> int:
    """LOCAL_RANK as set by torchrun; under nnU-Net's own single-node spawn (no LOCAL_RANK) the global rank."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def process_device(requested: torch.device) -> torch.device:
    """This process's device under DDP: the CPU for CPU runs, else ``cuda:LOCAL_RANK``."""
    if requested.type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", local_rank_from_environment())


def launch_from_environment(device_type: str) -> Launch:
    """Join the process group torchrun describes (no-op for a single process) on the right device.

    ``device_type`` is nnUNetv2_train's ``-device`` ('cuda', 'cpu' or 'mps')."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    host = socket.gethostname()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"-device cuda, but no CUDA device is visible on {host}; train on GPUs or "
                                        "pass -device cpu (gloo backend).")
        if local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK {local_rank} on {host}, but only {torch.cuda.device_count()} CUDA device(s) are visible "
                "there: --nproc-per-node must not exceed the GPUs of a node (check CUDA_VISIBLE_DEVICES).")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_type == "cpu":
        device = torch.device("cpu")
    elif device_type == "mps":
        if world_size > 1:
            raise DistributedSetupError("-device mps runs a single process; torchrun started "
                                        f"WORLD_SIZE={world_size}. Use cuda or cpu for several processes.")
        device = torch.device("mps")
    else:
        raise DistributedSetupError(f"-device must be cuda, cpu or mps, not {device_type!r}")
    if world_size > 1 and not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if v not in os.environ]
        if missing:
            raise DistributedSetupError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start this "
                                        "command through torchrun (see README, 'Multi-node training').")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Launch(rank, local_rank, world_size, device)


class StopRequest:
    """Set by SIGTERM/SIGUSR1; :meth:`agreed` tells every rank the same answer.

    The handler only records the signal (nothing unsafe runs inside a signal handler). Data-augmentation
    workers forked after :meth:`install` inherit it and ignore the signal (their pid differs): the main
    process shuts them down after the checkpoint."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._pid = os.getpid()
        self._previous: dict[signal.Signals, object] = {}

    def install(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> StopRequest:
        """Handle ``signals`` in this (main) thread from now on."""
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() == self._pid:
            self.signal_number = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number is not None else "a stop request"

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (one all_reduce of a scalar under DDP); every rank
        then knows the signal."""
        flag = torch.tensor([self.signal_number or 0], dtype=torch.int32, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.signal_number = int(flag.item())
            return True
        return False


class DistributedTrainerMixin:
    """Put in front of nnUNetTrainer (``class T(DistributedTrainerMixin, nnUNetTrainer)``) to run under
    torchrun on any number of nodes, GPUs or CPUs. Without a process group nothing changes; under nnU-Net's
    own single-node DDP the behaviour is nnU-Net's (local rank = global rank there)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.stop_request: StopRequest | None = None  # set by the torchrun entry point
        if self.is_ddp:  # nnU-Net chose cuda:<global rank>
            self.device = process_device(device)
            if self.device.type != "cuda":
                self.grad_scaler = None  # nnU-Net made a CUDA one; AMP is CUDA-only in nnU-Net
            self.print_to_log_file(f"DDP: world size {dist.get_world_size()}, {dist.get_backend()} backend; rank 0 "
                                   f"on {socket.gethostname()} uses {self.device} (each process: cuda:LOCAL_RANK)")

    def initialize(self):
        if not self.is_ddp or self.was_initialized:
            return super().initialize()
        # nnU-Net wraps the network as DDP(device_ids=[global rank]): the wrong GPU on every node but the first,
        # and refused for CPU modules. Let it build network, optimizer and loss as one process would, then split
        # the global batch over the ranks, wrap on this process's device and rebuild the loss for DDP (Dice
        # statistics gathered over ranks; nnU-Net's tiny weight on the last deep-supervision output).
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()
        if self.device.type == "cuda":  # SyncBatchNorm is CUDA-only (nnU-Net's plans use instance norm anyway)
            self.network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network)
        self.network = DistributedDataParallel(
            self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss = self._build_loss()

    # --- preemption ------------------------------------------------------------------------
    def run_training(self):
        """nnU-Net's loop; with a :class:`StopRequest` (torchrun entry point) it also checks after every
        iteration and epoch whether any rank was signalled, and then checkpoints and raises TrainingStopped."""
        if self.stop_request is None:
            return super().run_training()
        # the loop of nnUNetTrainer.run_training (nnunetv2 2.8), which has no hook between iterations, with the
        # two stop checks added
        self.on_train_start()
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for iteration in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                if self.stop_request.agreed(self.device):
                    self.checkpoint_and_stop(iteration + 1)
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            if self.current_epoch < self.num_epochs and self.stop_request.agreed(self.device):
                self.checkpoint_and_stop(None)
        self.on_train_end()

    def checkpoint_and_stop(self, iterations_done: int | None) -> None:
        """Write checkpoint_latest.pth (rank 0) so that ``--c`` starts again at the current epoch, shut the
        data loaders down and raise :class:`TrainingStopped` on every rank.

        ``iterations_done``: iterations finished in the interrupted epoch, None between epochs. An interrupted
        epoch is run again in full after resuming (its log entries are dropped here)."""
        epoch = self.current_epoch  # the epoch to (re)start; save_checkpoint stores current_epoch + 1
        for values in self.logger.local_logger.my_fantastic_logging.values():
            del values[epoch:]  # 'lrs', 'epoch_start_timestamps' of the interrupted epoch
        path = os.path.join(self.output_folder, LATEST_CHECKPOINT)
        self.current_epoch = epoch - 1
        try:
            self.save_checkpoint(path)
        finally:
            self.current_epoch = epoch
        if self.is_ddp:
            dist.barrier()  # nobody leaves before the checkpoint is complete
        self.finish_data_loaders()
        stopped = TrainingStopped(self.stop_request.signal_name if self.stop_request else "a stop request", epoch,
                                  iterations_done, None if self.disable_checkpointing else path)
        self.print_to_log_file(f"Training {stopped}")
        raise stopped

    def finish_data_loaders(self) -> None:
        """Stop the augmentation workers of every loader (nnU-Net's and the unlabeled stream)."""
        for name in DATA_LOADER_ATTRIBUTES:
            loader = getattr(self, name, None)
            if isinstance(loader, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                loader._finish()
