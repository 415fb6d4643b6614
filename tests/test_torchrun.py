"""Multi-process training through torchrun on CPU (gloo, 2 processes), the way a cluster job runs it:
`torchrun --standalone --nproc-per-node 2 -m nnunetv2_tak.cli.train_torchrun ...` is stopped by SIGTERM
to torchrun's process group in its second epoch (batch-system preemption), writes checkpoint_latest.pth
and resumes with --c (through the console script) to the end; the teachers are identical on both ranks,
the unlabeled shards disjoint, and the stock nnUNetv2_predict predicts from the checkpoint. Then the
same stop in one process without torchrun (SIGUSR1, exit code 75), in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, DATASET_ID, assert_predictions_on_label_grid, nnunet_cli
from nnunetv2.run.run_training import maybe_load_checkpoint
from test_trainer import new_trainer

from nnunetv2_tak.cli.train_torchrun import main as train_torchrun_main
from nnunetv2_tak.trainers.distributed import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.e2e

TRAINER = "TorchrunTAK"
EPOCHS, ITERATIONS = 3, 3
RECORDING_TRAINERS = textwrap.dedent(f'''
    """Test trainers (a user's nnUNet_extTrainer folder): each rank records what it saw."""
    import json
    import os
    import signal
    import time

    import torch
    import torch.distributed as dist

    from nnunetv2_tak.trainers import nnUNetTrainerTAK_RandomText_Debug


    class {TRAINER}(nnUNetTrainerTAK_RandomText_Debug):
        epochs = {EPOCHS}
        iterations_per_epoch = {ITERATIONS}

        def _rank_file(self, name):
            return os.path.join(self.output_folder, f"rank{{dist.get_rank()}}_{{name}}")

        def find_unlabeled_cases(self):
            shard = super().find_unlabeled_cases()
            with open(self._rank_file("setup.json"), "w") as f:
                json.dump({{"rank": dist.get_rank(), "world": dist.get_world_size(),
                           "local_rank": int(os.environ["LOCAL_RANK"]), "device": str(self.device),
                           "batch_size": self.batch_size, "ddp": type(self.network).__name__,
                           "shard": list(shard.identifiers), "all": list(self.unlabeled_cases)}}, f)
            return shard

        def train_step(self, batch):
            if self.teacher.step == {ITERATIONS}:  # first iteration of epoch 1 in the fresh run
                open(self._rank_file("in_epoch_1"), "w").close()  # the test sends SIGTERM now
                deadline = time.monotonic() + 300
                while self.stop_request.signal_number is None and time.monotonic() < deadline:
                    time.sleep(0.05)  # so that the stop comes after exactly this iteration
            return super().train_step(batch)

        def checkpoint_and_stop(self, iterations_done):
            torch.save(self.teacher.state_dict(), self._rank_file("teacher_stopped.pt"))
            super().checkpoint_and_stop(iterations_done)

        def on_train_end(self):
            torch.save(self.teacher.state_dict(), self._rank_file("teacher_final.pt"))
            super().on_train_end()


    class SignalledTAK(nnUNetTrainerTAK_RandomText_Debug):
        """One process: SIGUSR1 arrives during the first iteration of epoch 1 of a fresh run."""
        epochs = 2

        def train_step(self, batch):
            if self.teacher.step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
            return super().train_step(batch)
''')


@pytest.fixture(scope="module")
def torchrun_env(prepared_dataset, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("torchrun")
    (root / "trainers").mkdir()
    (root / "trainers" / "torchrun_test_trainers.py").write_text(RECORDING_TRAINERS)
    env = dict(prepared_dataset.env, nnUNet_results=str(root / "results"), nnUNet_extTrainer=str(root / "trainers"),
               nnUNet_n_proc_DA="1",  # forked augmentation workers: they must survive the signal
               OMP_NUM_THREADS="1")
    return env


def _fold(env: dict[str, str], trainer: str = TRAINER) -> Path:
    dataset = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*")).name
    return Path(env["nnUNet_results"]) / dataset / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


def _torchrun(env: dict[str, str], entry: list[str], *extra: str, stop_when: list[Path] | None = None,
              timeout: float = 900) -> tuple[int, str]:
    """Run torchrun with 2 CPU processes; SIGTERM its process group once all ``stop_when`` files exist."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *entry, str(DATASET_ID), "3d_fullres", "0",
           "-tr", TRAINER, "-device", "cpu", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while stop_when and proc.poll() is None and time.monotonic() < deadline:
            if all(p.exists() for p in stop_when):
                os.killpg(proc.pid, signal.SIGTERM)  # what a batch system does to the job step
                break
            time.sleep(0.1)
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(30)
    return code, "".join(lines)


@pytest.fixture(scope="module")
def preempted(torchrun_env):
    markers = [_fold(torchrun_env) / f"rank{r}_in_epoch_1" for r in (0, 1)]
    return _torchrun(torchrun_env, ["-m", "nnunetv2_tak.cli.train_torchrun"], stop_when=markers)


@pytest.fixture(scope="module")
def resumed(torchrun_env, preempted):
    code, out = _torchrun(torchrun_env, [str(BIN / "nnUNetv2_tak_train_torchrun")], "--c")
    assert code == 0, out[-6000:]
    return out


def _teacher(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_teacher(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for name, tensor in a["weights"].items():
        assert torch.equal(tensor, b["weights"][name]), name


def test_sigterm_to_torchrun_checkpoints_every_rank_and_exits(torchrun_env, preempted):
    code, out = preempted
    fold = _fold(torchrun_env)
    assert code != 0, out[-4000:]  # torchrun reports the signal it got; the workers stopped on their own
    assert "DDP: world size 2, gloo backend" in out
    assert "Training stopped by SIGTERM in epoch 1 after 1 iteration(s)" in out, out[-4000:]
    assert f"{fold / 'checkpoint_latest.pth'} written. Run the same command with --c" in out
    assert "Unable to shutdown process" not in out  # no rank needed SIGKILL
    assert not (fold / "checkpoint_final.pth").exists()
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1  # --c runs the interrupted epoch again
    assert latest["tak_ssl"]["teacher"]["step"] == ITERATIONS + 1
    assert {len(v) for v in latest["logging"].values()} == {1}  # epoch 0 only, the partial epoch dropped
    stopped = [_teacher(fold / f"rank{r}_teacher_stopped.pt") for r in (0, 1)]
    _assert_same_teacher(stopped[0], stopped[1])
    _assert_same_teacher(stopped[0], latest["tak_ssl"]["teacher"])


def test_resume_finishes_with_identical_teachers_and_disjoint_shards(torchrun_env, resumed):
    fold = _fold(torchrun_env)
    assert "Training done." in resumed
    setups = [json.loads((fold / f"rank{r}_setup.json").read_text()) for r in (0, 1)]
    for rank, setup in enumerate(setups):
        assert (setup["rank"], setup["world"], setup["local_rank"]) == (rank, 2, rank)
        assert setup["device"] == "cpu" and setup["ddp"] == "DistributedDataParallel"
        assert setup["batch_size"] == 1  # the planned batch of 2 split over 2 ranks, as nnU-Net does
    shards = [set(s["shard"]) for s in setups]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(setups[0]["all"]) and len(setups[0]["all"]) == 3
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == EPOCHS
    assert final["tak_ssl"]["teacher"]["step"] == ITERATIONS + 1 + (EPOCHS - 1) * ITERATIONS  # epoch 1 again, 2
    teachers = [_teacher(fold / f"rank{r}_teacher_final.pt") for r in (0, 1)]
    _assert_same_teacher(teachers[0], teachers[1])
    _assert_same_teacher(teachers[0], final["tak_ssl"]["teacher"])
    assert not (fold / "checkpoint_latest.pth").exists()
    summary = json.loads((fold / "validation" / "summary.json").read_text())  # validation sharded over ranks
    assert len(summary["metric_per_case"]) == 2


def test_stock_predict_from_the_torchrun_checkpoint(prepared_dataset, torchrun_env, resumed, tmp_path):
    pred = tmp_path / "pred"
    nnunet_cli("nnUNetv2_predict", "-i", str(prepared_dataset.raw / "imagesTs"), "-o", str(pred), "-d",
               str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta",
               "-chk", "checkpoint_final.pth", "-npp", "1", "-nps", "1", env=torchrun_env)
    assert_predictions_on_label_grid(pred, prepared_dataset.raw / "labelsTs", 16)


def test_single_process_stop_on_sigusr1_exits_75_and_resumes(nnunet_env, torchrun_env, monkeypatch):
    monkeypatch.setenv("nnUNet_results", torchrun_env["nnUNet_results"])
    monkeypatch.setenv("nnUNet_extTrainer", torchrun_env["nnUNet_extTrainer"])
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    before = signal.getsignal(signal.SIGUSR1)
    code = train_torchrun_main([str(DATASET_ID), "3d_fullres", "0", "-tr", "SignalledTAK", "-device", "cpu"])
    assert code == PREEMPTED_EXIT_CODE == 75
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers put back
    fold = _fold(torchrun_env, "SignalledTAK")
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "Training stopped by SIGUSR1 in epoch 1 after 1 iteration(s)" in log
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 1 and latest["tak_ssl"]["teacher"]["step"] == 3

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    trainer = new_trainer(recursive_find_trainer_class_by_name("SignalledTAK"), nnunet_env)
    maybe_load_checkpoint(trainer, True, False)  # --c: resumes from checkpoint_latest.pth
    assert trainer.current_epoch == 1
    trainer.run_training()  # nnU-Net's own loop (no stop request outside the entry point)
    assert trainer.current_epoch == 2 and trainer.teacher.step == 5
    assert (fold / "checkpoint_final.pth").is_file() and not (fold / "checkpoint_latest.pth").exists()
