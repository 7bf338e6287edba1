"""The --use-gpu path without a GPU: device choice, NCCL, and what the trainer asks Ray for.

No GPU exists on this machine, so `torch.cuda.is_available` is patched where a test needs one;
the real CUDA path is checked on a lent GPU machine (docs/performance.md).
"""

import pytest
import torch

from job.runtime.driver import build_trainer
from tests.conftest import driver_run
from job.config import TrainConfig
from job.runtime.distributed import backend_for, select_device
from job.errors import UsageError


def test_cpu_workers_use_gloo_and_gpu_workers_use_nccl():
    assert backend_for(False) == "gloo"
    assert backend_for(True) == "nccl"


def test_cpu_device_without_use_gpu():
    assert select_device(False) == torch.device("cpu")


def test_use_gpu_without_a_visible_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--use-gpu"):
        select_device(True)


def test_trainer_asks_ray_for_one_gpu_per_worker_and_nccl(tmp_path):
    config = TrainConfig(use_gpu=True, num_workers=4, cpus_per_worker=3, storage=str(tmp_path), run_name="gpu")
    trainer = build_trainer(driver_run(config))
    scaling = trainer.scaling_config
    assert scaling.use_gpu and scaling.num_workers == 4
    assert scaling.resources_per_worker == {"CPU": 3, "GPU": 1}
    assert trainer.backend_config.backend == "nccl"


def test_an_elastic_run_asks_ray_train_for_min_and_max_workers(tmp_path):
    config = TrainConfig(num_workers=1, max_workers=4, batch_size=240, cpus_per_worker=1, elastic_resize_interval=7.5,
                         storage=str(tmp_path), run_name="elastic")  # fmt: skip
    scaling = build_trainer(driver_run(config)).scaling_config
    assert scaling.num_workers == (1, 4) and scaling.elastic_resize_monitor_interval_s == 7.5
    assert build_trainer(driver_run(config.replace(max_workers=1))).scaling_config.num_workers == 1  # N-N is N


def test_trainer_uses_gloo_and_no_gpu_on_cpu(tmp_path):
    trainer = build_trainer(
        driver_run(TrainConfig(num_workers=2, cpus_per_worker=1, storage=str(tmp_path), run_name="cpu"))
    )
    assert not trainer.scaling_config.use_gpu and trainer.backend_config.backend == "gloo"


def test_cuda_graphs_on_without_use_gpu_is_refused_in_one_line_naming_the_flag(tmp_path, capsys):
    from job.cli import main

    code = main(["train", "--cuda-graphs", "on", "--storage", str(tmp_path / "runs"), "--run-name", "r"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--cuda-graphs on" in lines[0] and "--use-gpu" in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_cuda_graphs_off_and_auto_need_no_gpu():
    for mode in ("off", "auto"):
        assert TrainConfig(cuda_graphs=mode, storage="/tmp/unused", run_name="r").cuda_graphs == mode
