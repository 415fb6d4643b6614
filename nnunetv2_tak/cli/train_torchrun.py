"""nnUNetv2_tak_train_torchrun: nnUNetv2_train for torchrun, one process per GPU on any number of nodes.

Same arguments as nnUNetv2_train except -num_gpus (torchrun's --nnodes x --nproc-per-node decide)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m nnunetv2_tak.cli.train_torchrun 501 3d_fullres 0 -tr nnUNetTrainerTAK

The process group comes from torchrun's environment (nccl on CUDA, gloo with -device cpu), each process
uses cuda:LOCAL_RANK, the planned batch is split over all ranks as nnU-Net does, rank 0 writes logs and
checkpoints (nnUNet_preprocessed and nnUNet_results must be on a filesystem every node sees).
SIGTERM/SIGUSR1 (batch-system preemption) stop every rank after the current iteration: rank 0 writes
checkpoint_latest.pth and the processes exit with code 75; rerun the same command with --c to resume.
Without torchrun it trains in one process, with the same preemption handling.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
import torch.distributed as dist

from nnunetv2_tak.trainers.distributed import (
    PREEMPTED_EXIT_CODE,
    DistributedSetupError,
    DistributedTrainerMixin,
    StopRequest,
    TrainingStopped,
    launch_from_environment,
)

logger = logging.getLogger(__name__)

PROG = "nnUNetv2_tak_train_torchrun"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_name_or_id", help="dataset name or id to train with")
    p.add_argument("configuration", help="configuration to train, e.g. 3d_fullres")
    p.add_argument("fold", help="fold of the 5-fold cross-validation (0-4) or 'all'")
    p.add_argument("-tr", default="nnUNetTrainerTAK",
                   help="trainer class (nnUNetTrainerTAK or any subclass nnU-Net can find). Default: nnUNetTrainerTAK")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier. Default: nnUNetPlans")
    p.add_argument("-pretrained_weights", default=None,
                   help="nnU-Net checkpoint to initialise the network from (new runs only)")
    p.add_argument("-num_gpus", type=int, default=None,
                   help="not used: the processes are torchrun's (--nnodes x --nproc-per-node); if given, it must "
                        "equal their number")
    p.add_argument("--npz", action="store_true", help="also save softmax predictions of the final validation")
    p.add_argument("--c", action="store_true", help="continue training from the latest checkpoint")
    p.add_argument("--val", action="store_true", help="only run the validation (training must have finished)")
    p.add_argument("--val_best", action="store_true", help="validate with checkpoint_best instead of checkpoint_final")
    p.add_argument("--disable_checkpointing", action="store_true", help="write no checkpoints")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"),
                   help="cuda (nccl, one GPU per process: cuda:LOCAL_RANK), cpu (gloo) or mps (single process)")
    return p


def _fold(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{PROG}: fold must be an integer or 'all', not {value!r}") from None


def _new_trainer(args: argparse.Namespace, device: torch.device):
    """nnU-Net's get_trainer_from_args, refusing trainers that cannot place themselves under torchrun."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name(args.tr)
    if cls is None:
        raise SystemExit(f"{PROG}: trainer {args.tr!r} not found (nnU-Net searches nnunetv2.training.nnUNetTrainer "
                         "and the folders in nnUNet_extTrainer)")
    if not issubclass(cls, DistributedTrainerMixin):
        raise SystemExit(f"{PROG}: {args.tr} is not an nnUNetTrainerTAK (nor a DistributedTrainerMixin subclass), "
                         "so it would put every process on cuda:<global rank>. Train a TAK trainer, declare "
                         f"`class My{args.tr}(DistributedTrainerMixin, {args.tr})` "
                         "(nnunetv2_tak.trainers.distributed), or "
                         "use nnUNetv2_train -num_gpus for single-node DDP.")
    dataset = args.dataset_name_or_id
    name = maybe_convert_to_dataset_name(dataset if dataset.startswith("Dataset") else int(dataset))
    folder = join(nnUNet_preprocessed, name)
    plans = load_json(join(folder, args.p + ".json"))
    plans["continue_training"] = args.c
    return cls(plans=plans, configuration=args.configuration, fold=_fold(args.fold),
               dataset_json=load_json(join(folder, "dataset.json")), device=device)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.c and args.val:
        raise SystemExit(f"{PROG}: --c and --val cannot be combined")
    if args.val_best and args.disable_checkpointing:
        raise SystemExit(f"{PROG}: --val_best needs checkpoints; drop --disable_checkpointing")
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from torch.backends import cudnn

    if args.device == "cuda":
        torch.set_num_threads(1)  # as nnUNetv2_train: more threads do not help on GPU
        torch.set_num_interop_threads(1)
    try:
        launch = launch_from_environment(args.device)
    except DistributedSetupError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    stop = StopRequest().install()  # before any data-loader worker is forked: they inherit and ignore it
    try:
        if args.num_gpus is not None and args.num_gpus != launch.world_size:
            raise SystemExit(f"{PROG}: -num_gpus {args.num_gpus}, but torchrun started {launch.world_size} "
                             "process(es); drop -num_gpus (torchrun's --nnodes x --nproc-per-node decide)")
        trainer = _new_trainer(args, launch.device)
        trainer.stop_request = stop
        if args.disable_checkpointing:
            trainer.disable_checkpointing = True
        maybe_load_checkpoint(trainer, args.c, args.val, args.pretrained_weights)
        if launch.device.type == "cuda":
            cudnn.deterministic = False
            cudnn.benchmark = True
        try:
            if not args.val:
                trainer.run_training()
                if stop.agreed(trainer.device):  # signalled during the last epoch: validate after --c
                    trainer.print_to_log_file(f"Training finished, stopped by {stop.signal_name} before the final "
                                              "validation; --c runs it.")
                    return PREEMPTED_EXIT_CODE
            if args.val_best:
                trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
            trainer.perform_actual_validation(args.npz)
        except TrainingStopped:
            return PREEMPTED_EXIT_CODE  # rank 0 logged what was written and how to resume
        return 0
    finally:
        stop.restore()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
