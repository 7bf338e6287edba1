"""The driver's hand-over to Ray Train workers (no Ray started)."""

from job.config import TrainConfig


def test_workers_get_absolute_local_locations(tmp_path, monkeypatch):
    """Ray workers run in their own folders: a relative --storage or --data-dir must not follow them there."""
    from job.commands.train import absolute_locations

    monkeypatch.chdir(tmp_path)
    config = absolute_locations(TrainConfig(storage="runs", data_dir="data", run_name="r"))
    assert config.storage == str(tmp_path / "runs") and config.data_dir == str(tmp_path / "data")
    on_s3 = absolute_locations(TrainConfig(storage="s3://bucket/runs/", data_dir="s3://bucket/data", run_name="r"))
    assert on_s3.storage == "s3://bucket/runs" and on_s3.data_dir == "s3://bucket/data"
