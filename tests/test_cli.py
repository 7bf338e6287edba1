"""The command line, called in-process: help everywhere, env-var knobs, bad input ends cleanly."""

import json

import pytest

from job.cli import build_parser, env_var_for, main


def train_argv(data_dir, storage, *flags: str, run_name: str | None = "r") -> list[str]:
    """`train` on the tiny data into `storage`, with `flags`."""
    named = ["--run-name", run_name] if run_name else []
    return ["train", "--data", "fashion-mnist", "--data-dir", str(data_dir), "--storage", str(storage), *named, *flags]


HELP = [
    ["--help"],
    *([command, "--help"] for command in ("train", "generate", "evaluate", "promote", "bench")),
    ["data", "push", "--help"],
]


@pytest.mark.parametrize("command", HELP, ids=" ".join)
def test_every_command_has_help(command, capsys):
    assert main(command) == 0
    assert "usage:" in capsys.readouterr().out


def test_help_works_even_when_a_knob_is_bad(monkeypatch, capsys):
    monkeypatch.setenv(env_var_for("epochs"), "many")
    assert main(["train", "--help"]) == 0
    assert "GAN_JOB_EPOCHS" in capsys.readouterr().out


def test_train_flags_come_from_environment_variables_and_flags_win(monkeypatch):
    monkeypatch.setenv(env_var_for("epochs"), "7")
    monkeypatch.setenv(env_var_for("use_gpu"), "true")
    args = build_parser().parse_args(["train"])
    assert args.epochs == 7 and args.use_gpu is True
    assert build_parser().parse_args(["train", "--epochs", "3"]).epochs == 3


BAD_TRAIN_INPUT = [
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "-1"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--data", "cifar10"], "--data"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--num-workers", "0"], "--num-workers"),
    (["--num-workers", "3"], "--batch-size"),  # 256 does not split across 3
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--max-failures", "-1"], "--max-failures"),
    (["--noise-dim", "0"], "--noise-dim"),
    (["--limit", "0"], "--limit"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker"),
    (["--seed", "-5"], "--seed"),
    (["--run-name", "../escape"], "--run-name"),
    (["--run-name", "a b"], "--run-name"),
    (["--storage", "s3://"], "--storage"),
    (["--storage", "gs://bucket/x"], "--storage"),
]


@pytest.mark.parametrize("flags, named", BAD_TRAIN_INPUT, ids=[" ".join(f) for f, _ in BAD_TRAIN_INPUT])
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(flags, named, tmp_path, capsys, tiny_data_dir):
    storage = tmp_path / "runs"
    argv = train_argv(tiny_data_dir, storage, *flags)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in captured.err
    assert not storage.exists()


def test_missing_data_folder_is_named_and_nothing_is_written(tmp_path, capsys):
    storage = tmp_path / "runs"
    argv = ["train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "absent"), "--storage", str(storage)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data-dir" in err
    assert not storage.exists()


def test_bad_boolean_environment_variable_is_named(monkeypatch, capsys):
    monkeypatch.setenv(env_var_for("use_gpu"), "maybe")
    assert main(["train"]) == 2
    assert "GAN_JOB_USE_GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, named",
    [
        (["generate", "--from", "/nonexistent/run", "--out", "x.png"], "--from"),
        (["generate", "--from", "/nonexistent/run", "--out", "x.png", "--num", "0"], "--num"),
        (["bench", "--steps", "0"], "--steps"),
        (["data", "push", "--data", "fashion-mnist", "--to", "/local/folder"], "--to"),
        (["data", "push", "--data", "fashion-mnist", "--to", "s3://"], "--to"),
    ],
)
def test_bad_input_to_other_commands(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_recipes_set_hyperparameters_and_explicit_flags_win():
    from job.config import TrainConfig

    tutorial = TrainConfig(run_name="r")
    assert (tutorial.batch_size, tutorial.lr, tutorial.beta1, tutorial.ema_decay) == (256, 1e-4, 0.9, 0.0)
    stable = TrainConfig(run_name="r", recipe="stable")
    assert (stable.batch_size, stable.lr, stable.beta1, stable.ema_decay) == (64, 2e-4, 0.5, 0.999)
    assert TrainConfig(run_name="r", recipe="stable", lr=5e-5).lr == 5e-5
    assert TrainConfig(run_name="r", recipe="stable", batch_size=256).batch_size == 256


@pytest.mark.parametrize("flags, named", [
    (["--recipe", "fast"], "--recipe"), (["--beta1", "1.0"], "--beta1"), (["--ema-decay", "-0.1"], "--ema-decay"),
    (["--eval-every", "-1"], "--eval-every"), (["--eval-num", "5"], "--eval-num"),
    (["--on-divergence", "panic"], "--on-divergence"), (["--on-collapse", "ignore"], "--on-collapse"),
])  # fmt: skip
def test_bad_recipe_and_guard_flags_are_named(flags, named, tmp_path, capsys, tiny_data_dir):
    argv = train_argv(tiny_data_dir, tmp_path / "runs", *flags, run_name=None)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
    assert not (tmp_path / "runs").exists()


# `train --promote-to`: checked before any Ray work, and never an environment knob.


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Reaching `connect_ray` fails the test: bad promotion input is refused before Ray."""
    import job.runtime.driver

    def refuse() -> None:
        raise AssertionError("bad input reached Ray: job.runtime.driver.connect_ray() was called")

    monkeypatch.setattr(job.runtime.driver, "connect_ray", refuse)


def not_a_pointer(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "LATEST").write_text("not json")
    return str(tmp_path / "job" / "LATEST")


def a_folder(tmp_path):
    (tmp_path / "job" / "LATEST").mkdir(parents=True)
    return str(tmp_path / "job" / "LATEST")


BAD_PROMOTIONS = [
    pytest.param(["--promote-margin", "nan"], "--promote-margin", id="margin nan"),
    pytest.param(["--promote-margin", "inf"], "--promote-margin", id="margin inf"),
    pytest.param(["--promote-margin", "-1"], "--promote-margin", id="margin -1"),
    pytest.param(["--promote-margin", "five"], "--promote-margin", id="margin not a number"),
    pytest.param(["--promote-margin", "0.05"], "--promote-to", id="margin without a target"),
    pytest.param(["--promote-to", "{tmp}/job"], "--promote-to", id="no pointer name"),
    pytest.param(["--promote-to", "{tmp}/job/LATEST/"], "--promote-to", id="trailing slash"),
    pytest.param(["--promote-to", "gs://bucket/job/LATEST"], "--promote-to", id="unsupported scheme"),
    pytest.param(["--promote-to", "s3:///job/LATEST"], "--promote-to", id="no bucket"),
    pytest.param(
        ["--promote-to", "{tmp}/job/LATEST", "--promote-margin", "nan"],
        "--promote-margin",
        id="target and a bad margin",
    ),
    pytest.param(["--promote-to", a_folder], "--promote-to", id="a folder"),
    pytest.param(["--promote-to", not_a_pointer], "--promote-to", id="not a pointer"),
]


@pytest.mark.usefixtures("ray_must_not_start")
@pytest.mark.parametrize("flags, named", BAD_PROMOTIONS)
def test_a_bad_promotion_is_refused_before_training_in_one_line(flags, named, tmp_path, capsys, tiny_data_dir):
    flags = [flag(tmp_path) if callable(flag) else flag.format(tmp=tmp_path) for flag in flags]
    storage = tmp_path / "runs"
    argv = train_argv(tiny_data_dir, storage, *flags)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("gan-job") and named in lines[0] and "Traceback" not in captured.err
    ), lines
    assert not storage.exists()


@pytest.mark.s3
@pytest.mark.usefixtures("ray_must_not_start")
def test_a_promotion_into_a_missing_bucket_is_refused_before_training(s3_server, tmp_path, capsys, tiny_data_dir):
    storage = tmp_path / "runs"
    argv = ["train", "--data", "fashion-mnist", "--data-dir", str(tiny_data_dir), "--storage", str(storage),
            "--run-name", "r", "--promote-to", "s3://no-such-bucket-gan-job/job/LATEST",
            "--s3-endpoint", s3_server.url]  # fmt: skip
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--promote-to" in lines[0] and "no-such-bucket-gan-job" in lines[0], lines
    assert not storage.exists()


def test_promotion_is_never_an_environment_knob(monkeypatch, tmp_path, tiny_data_dir):
    import job.commands.train
    from job.promotion.gate import Promotion

    monkeypatch.setenv("GAN_JOB_PROMOTE_TO", str(tmp_path / "job" / "LATEST"))
    monkeypatch.setenv("GAN_JOB_PROMOTE_MARGIN", "nan")  # would be refused, were it read
    args = build_parser().parse_args(["train"])
    assert args.promote_to is None and args.promote_margin is None
    seen = []
    monkeypatch.setattr(job.commands.train, "run_training", lambda config, promotion=None: seen.append(promotion) or 0)
    argv = train_argv(tiny_data_dir, tmp_path / "runs")
    assert main(argv) == 0 and seen == [None]
    assert main([*argv, "--promote-to", str(tmp_path / "job" / "LATEST")]) == 0
    assert seen[-1] == Promotion(str(tmp_path / "job" / "LATEST"), 0.0), "promote's default margin"
    assert main([*argv, "--promote-to", str(tmp_path / "job" / "LATEST"), "--promote-margin", "0.05"]) == 0
    assert seen[-1].margin == 0.05
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # noqa: SLF001
    assert "GAN_JOB_PROMOTE" not in train_help


def test_bench_prints_one_json_line_even_without_warmup(capsys):
    import json

    assert main(["bench", "--steps", "1", "--warmup", "0", "--batch-size", "8"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line)["steps"] == 1


def _bench(capsys, *flags: str) -> dict:
    assert main(["bench", "--warmup", "0", *flags]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    return json.loads(line)


def test_bench_times_the_step_of_32x32x3_images_and_counts_its_gflop_per_image(capsys):
    result = _bench(capsys, "--steps", "2", "--batch-size", "8", "--resolution", "32", "--channels", "3")
    assert (result["resolution"], result["channels"], result["steps"]) == (32, 3, 2)
    assert result["images_per_s"] > 0 and result["gflop_per_image"] > 0
    # Per image: the count of one step divided by its batch, so the batch size does not change it.
    smaller = _bench(capsys, "--steps", "1", "--batch-size", "4", "--resolution", "32", "--channels", "3")
    assert smaller["gflop_per_image"] == pytest.approx(result["gflop_per_image"], rel=1e-3)
    tutorial = _bench(capsys, "--steps", "1", "--batch-size", "4")
    assert (tutorial["resolution"], tutorial["channels"]) == (28, 1)
    assert tutorial["gflop_per_image"] != result["gflop_per_image"]


def test_bench_times_real_images_at_the_shape_asked_for(tiny_data_dir, capsys):
    argv = ["bench", "--data", "mnist", "--data-dir", str(tiny_data_dir), "--steps", "1", "--warmup", "0"]
    assert main([*argv, "--batch-size", "8", "--resolution", "32", "--channels", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["resolution"], result["channels"]) == (32, 3)  # the 28x28 grey images converted, not refused


def test_an_empty_knob_counts_as_unset(monkeypatch):
    monkeypatch.setenv(env_var_for("epochs"), "")
    monkeypatch.setenv(env_var_for("lr"), " ")
    args = build_parser().parse_args(["train"])
    assert args.epochs is None and args.lr is None  # TrainConfig's defaults (and the recipe's) apply


def test_promote_refuses_a_target_that_names_no_pointer_as_train_does(tmp_path, capsys):
    """`promote --target <dir>/NOTLATEST` is refused by the rule `train --promote-to` follows, writing nothing."""
    code = main(["promote", "--run", str(tmp_path / "runs" / "a"), "--target", str(tmp_path / "job" / "NOTLATEST")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--target" in lines[0] and "does not name a pointer" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flag, name", [("--out", "grid.jpg"), ("--out", "grid"), ("--npy", "images"), ("--npy", "images.npz")]
)
def test_generate_refuses_an_output_name_of_another_format(tmp_path, capsys, flag, name):
    """The grid is always PNG and the array .npy: a name that says otherwise is refused before anything is read."""
    out = {"--out": str(tmp_path / "grid.png"), "--npy": None, flag: str(tmp_path / name)}
    argv = ["generate", "--from", str(tmp_path / "no-run"), "--out", out["--out"]] + (
        ["--npy", out["--npy"]] if out["--npy"] else []
    )
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and flag in lines[0] and name in lines[0]
    assert list(tmp_path.iterdir()) == []
