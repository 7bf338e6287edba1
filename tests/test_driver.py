"""The driver's hand-over to Ray Train workers (no Ray started)."""

from job.config import TrainConfig
from job.runtime.driver import check


def test_workers_get_absolute_local_locations(tmp_path, small_fashion_dir, monkeypatch):
    """Ray workers run in their own folders: a relative --storage or --data-dir must not follow them there."""
    (tmp_path / "data").symlink_to(small_fashion_dir)
    monkeypatch.chdir(tmp_path)
    run = check(TrainConfig(data="fashion-mnist", storage="runs", data_dir="data", run_name="r", limit=32))
    assert run.config.storage == str(tmp_path / "runs") and run.config.data_dir == str(tmp_path / "data")
    assert run.run.uri == str(tmp_path / "runs" / "r") and run.start == "scratch"
