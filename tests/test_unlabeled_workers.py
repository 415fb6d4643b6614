"""The unlabeled stream's loader workers end when the training process dies, even by kill -9: a parent process
starts nnU-Net's loader over ImageOnlyDataset in batchgenerators' NonDetMultiThreadedAugmenter, as the trainer
does, and is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nnunetv2_tak.unlabeled.shards import pid_alive

PARENT = """
import json, os, sys, time
from pathlib import Path
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2_tak.unlabeled import ImageOnlyDataset

folder, plans_file, dataset_json_file = sys.argv[1:]
plans = PlansManager(plans_file)
patch = plans.get_configuration("3d_fullres").patch_size
dataset = ImageOnlyDataset.from_folders([(Path(folder), ["case_0000"])])
loader = nnUNetDataLoader(dataset, 1, patch, patch, plans.get_label_manager(json.load(open(dataset_json_file))),
                          oversample_foreground_percent=0.0)
stream = NonDetMultiThreadedAugmenter(loader, None, 2, num_cached=2, seeds=None, wait_time=0.002)
next(stream)
print(json.dumps([p.pid for p in stream._processes]), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the death signal is Linux's prctl")
def test_loader_workers_end_when_the_training_process_is_killed(prepared_dataset, tmp_path):
    data = prepared_dataset.preprocessed
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(data / "nnUNetPlans_3d_fullres"),
                               str(data / "nnUNetPlans.json"), str(data / "dataset.json")],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **prepared_dataset.env})
    workers: list[int] = []
    try:
        workers = json.loads(parent.stdout.readline())
        assert len(workers) == 2 and all(pid_alive(pid) for pid in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not [pid for pid in workers if pid_alive(pid)], "loader workers outlived the killed training process"
    finally:
        parent.kill()
        for pid in workers:  # started by this test's parent: never leave them running
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
