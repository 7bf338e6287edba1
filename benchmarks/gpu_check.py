#!/usr/bin/env python3
"""The one prepared check for a GPU machine (issue 20): the step's speed, graphed against eager, the
epoch's time, host syncs, and Ray Train on the GPU with NCCL. docs/performance.md says how to run it.

It runs in at most --budget-s seconds (default 230: twice in a 15-minute slot of GPU time, with
start-up) and rewrites --out (results.json) after every stage, so that a timeout still brings the
stages done back. A stage that fails records its error and the next one runs.

Written for a machine with torch (2.11 or later) and Python 3.12 but no gan-job, no Ray and no
package index: `--wheels DIR` unpacks the wheels `benchmarks/pack_gpu_wheels.py` made and puts
them, and the repository root, on the path of this process and of the `python3 -m job` it starts.
On a CPU, `--device cpu --quick` runs every stage small (tests/test_gpu_check.py), so that GPU time
is never spent on a bug in this script.

Stages:
  1 versions and flags: torch, CUDA, cuDNN, NCCL, the GPU, TF32;
  2 bench: eager against graphed, fp32 against bf16 (and TF32 matmuls), batch 64 and 256, kernels per step;
  3 equivalence over 20 steps from one seed and state: graphed against eager, deterministic and with cudnn.benchmark;
  4 three full-loop epochs at batch 256 in one process (LocalSession), eager then graphed, on synthetic
    MNIST-shaped data;
  5 one epoch of steps under torch.cuda.set_sync_debug_mode("warn"), counting host syncs;
  6 Ray Train: `python3 -m job train --use-gpu --num-workers 1` (NCCL) to the end of a short run, then resumed; and,
    in this process, the graphed step under DDP forced on over a world-size-1 NCCL group, with the project's
    gathers and broadcasts over that group.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from pathlib import Path
from typing import Callable

# Deterministic cuBLAS (stage 3) needs this before CUDA is first used.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

REPO = Path(__file__).resolve().parents[1]
STAGE_MIN_S = {"1_versions": 5, "2_bench": 25, "3_equivalence": 10, "4_full_loop": 45, "5_syncs": 10, "6_ray_train": 60}
MNIST_TRAIN, MNIST_TEST = 60_000, 10_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    parser.add_argument("--quick", action="store_true", help="every stage small: the CPU rehearsal the test suite runs")
    parser.add_argument(
        "--out", type=Path, default=Path("results.json"), help="the results file, rewritten after each stage"
    )
    parser.add_argument(
        "--wheels", type=Path, help="folder of wheels to unpack and put on the path (the GPU machine has no Ray)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=230.0, help="stop starting stages after this many seconds (default 230)"
    )
    parser.add_argument("--stages", default="1,2,3,4,5,6", help="which stages to run, e.g. 1,2,3 (default all)")
    parser.add_argument("--ray-address", help="run stage 6's job on this Ray cluster instead of a local one it starts")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    refusal = out_refusal(args.out)
    if refusal is not None:  # before any stage, so that no GPU time is spent on a report that cannot be written
        print(f"gpu_check: {refusal}", file=sys.stderr)
        return 2

    started_s = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.work_dir is None else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    site = unpack_wheels(args.wheels, work / "site") if args.wheels else None
    for path in (str(REPO), *([str(site)] if site else [])):
        sys.path.insert(0, path)
    os.environ["XDG_CACHE_HOME"] = str(work / "cache")  # the classifier cache of stage 4, and nothing of the user's

    check = Check(args, started_s, work, site)
    wanted = {int(s) for s in args.stages.split(",")}
    stages: list[tuple[int, str, Callable[[Check], dict]]] = [
        (1, "1_versions", stage_versions), (2, "2_bench", stage_bench), (3, "3_equivalence", stage_equivalence),
        (4, "4_full_loop", stage_full_loop), (5, "5_syncs", stage_syncs), (6, "6_ray_train", stage_ray_train),
    ]  # fmt: skip
    try:
        for number, name, run in stages:
            if number in wanted:
                check.run_stage(name, run)
    finally:
        check.results["total_s"] = round(time.perf_counter() - started_s, 1)
        check.write()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    failed = [name for name, stage in check.results["stages"].items() if stage["status"] == "error"]
    print(
        f"gpu_check: {len(check.results['stages'])} stages in {check.results['total_s']} s; "
        f"failed: {failed or 'none'}; {args.out}"
    )
    return 1 if failed else 0


def out_refusal(out: Path) -> str | None:
    """Why the report cannot be written to `out` (one line, naming --out and the fix), or None when it can."""
    try:
        if out.is_dir():
            return f"--out {out} is a folder; pass a file in it, e.g. --out {out / 'results.json'}"
        parent = out.parent
        if not parent.is_dir():
            problem = "is not a folder" if parent.exists() else "does not exist"
            return f"--out {out}: its folder {parent} {problem}; create it or pass a file in an existing folder"
    except OSError as err:  # a folder on the way that may not be searched
        return f"--out {out} cannot be reached ({err.strerror}); pass a file in a folder you can write to"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out}: its folder {parent} is not writable; pass a file in a folder you can write to"
    return None


class Check:
    """The run's settings, its clock and its results, written after every stage."""

    def __init__(self, args: argparse.Namespace, started_s: float, work: Path, site: Path | None) -> None:
        self.args, self.started_s, self.work, self.site = args, started_s, work, site
        self.quick = args.quick
        self.results: dict = {
            "check": "benchmarks/gpu_check.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:], "device": args.device, "quick": args.quick, "stages": {},
        }  # fmt: skip

    @property
    def device(self):
        import torch

        return torch.device(self.args.device)

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started_s)

    def run_stage(self, name: str, run: Callable[[Check], dict]) -> None:
        needed_s = STAGE_MIN_S[name] if not self.quick else 1
        if self.left_s() < needed_s:
            self.results["stages"][name] = {
                "status": "skipped",
                "reason": f"{self.left_s():.0f} s left of the budget, {needed_s} s needed",
            }
            self.write()
            return
        print(f"gpu_check: stage {name} ({self.left_s():.0f} s left)", flush=True)
        start_s = time.perf_counter()
        try:
            outcome = {"status": "ok", **run(self)}
        except Exception as err:  # a failed stage is a result too; the next stage still runs
            outcome = {
                "status": "error",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-3000:],
            }
        outcome["stage_s"] = round(time.perf_counter() - start_s, 2)
        self.results["stages"][name] = outcome
        self.write()

    def write(self) -> None:
        partial = self.args.out.with_suffix(".partial")
        partial.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        partial.replace(self.args.out)  # whole or not at all, should the machine be taken away mid-write

    def job_env(self, **extra: str) -> dict[str, str]:
        """The environment of a `python3 -m job` subprocess: the unpacked wheels and the repository on its path."""
        paths = [str(REPO), *([str(self.site)] if self.site else []), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


# Wheels ---------------------------------------------------------------------------------------------


def unpack_wheels(folder: Path, site: Path) -> Path:
    """Unzip every wheel in `folder` into `site`, keeping the executable bits
    (Ray's raylet and GCS server need them)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: --wheels {folder} holds no .whl files; run benchmarks/pack_gpu_wheels.py first")
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                target = Path(archive.extract(member, site))
                mode = member.external_attr >> 16
                if mode & stat.S_IXUSR:
                    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return site


# Stage 1 --------------------------------------------------------------------------------------------


def stage_versions(check: Check) -> dict:
    import torch

    found: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32_cudnn_allowed": torch.backends.cudnn.allow_tf32,
        "tf32_matmul_allowed": torch.backends.cuda.matmul.allow_tf32,
    }
    if check.device.type == "cuda":
        properties = torch.cuda.get_device_properties(check.device)
        found.update(
            gpu=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
            gpus=torch.cuda.device_count(),
        )
    for module, distribution in (
        ("ray", "ray"),
        ("pydantic", "pydantic"),
        ("jsonschema", "jsonschema"),
        ("tensorboardX", "tensorboardX"),
        ("pyarrow", "pyarrow"),
        ("pandas", "pandas"),
        ("matplotlib", "matplotlib"),
        ("torchmetrics", "torchmetrics"),
        ("torchvision", "torchvision"),
    ):
        # Found on the path, without importing it (Ray alone takes seconds): stage 6 shows whether it works.
        if importlib.util.find_spec(module) is None:
            found[f"{module}_version"] = "missing"
            continue
        try:
            found[f"{module}_version"] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[f"{module}_version"] = "present, version unknown"
    try:
        git = ["git", "-C", str(REPO), "rev-parse", "HEAD"]
        found["repo_commit"] = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found["repo_commit"] = "unknown"
    return found


# Stage 2 --------------------------------------------------------------------------------------------


def stage_bench(check: Check) -> dict:
    import torch

    from job.commands.bench import bench_stepper, measure

    cuda = check.device.type == "cuda"
    batches = (16,) if check.quick else (64, 256)
    steps, warmup = (2, 1) if check.quick else (100, 10)
    rows, skipped = [], []
    for batch in batches:
        for precision in ("fp32", "bf16"):
            for graphs in ("off", "on"):
                if graphs == "on" and not cuda:
                    skipped.append(f"batch {batch} {precision} graphed: no CUDA")
                    continue
                rows.append(measure(check.device, batch, steps, warmup, precision, graphs))
    if cuda:  # TF32 matmuls (the Linear layers; cuDNN convolutions use TF32 by default already)
        for graphs in ("off", "on"):
            torch.set_float32_matmul_precision("high")
            try:
                rows.append({**measure(check.device, 256, steps, warmup, "fp32", graphs), "tf32_matmul": True})
            finally:
                torch.set_float32_matmul_precision("highest")

    kernels = {}
    for graphs in ("off", "on") if cuda else ("off",):
        stepper, run = bench_stepper(check.device, batches[-1], "fp32", graphs)
        run(1 if check.quick else 5)  # past the warm-up and capture
        kernels[f"graphs_{graphs}"] = launches_per_step(run, 2 if check.quick else 10)
    return {"rows": rows, "skipped": skipped, "launches_per_step": kernels}


def launches_per_step(run: Callable[[int], None], steps: int) -> dict:
    """Kernels (CUDA) and operators (CPU) per step, as torch.profiler records them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run(steps)
    events = prof.events()
    cuda_kernels = sum(1 for e in events if str(e.device_type).endswith("CUDA"))
    aten_ops = sum(1 for e in events if e.name.startswith("aten::") and not str(e.device_type).endswith("CUDA"))
    graph_launches = sum(1 for e in events if "cudaGraphLaunch" in e.name)
    return {"cuda_kernels": round(cuda_kernels / steps, 1), "cpu_aten_ops": round(aten_ops / steps, 1),
            "graph_launches": round(graph_launches / steps, 1)}  # fmt: skip


# Stage 3 --------------------------------------------------------------------------------------------


def stage_equivalence(check: Check) -> dict:
    import torch

    cuda = check.device.type == "cuda"
    batch, steps = (16, 6) if check.quick else (256, 20)
    found: dict = {"batch": batch, "steps": steps}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            runs = {"eager": twenty_steps(check, batch, steps, "off", benchmark=False)}
            runs["eager_again"] = twenty_steps(check, batch, steps, "off", benchmark=False)
            found["deterministic_eager_vs_eager"] = compare(runs["eager"], runs["eager_again"])
            if cuda:
                runs["eager_capturable"] = twenty_steps(check, batch, steps, "off", benchmark=False, capturable=True)
                runs["graphed"] = twenty_steps(check, batch, steps, "on", benchmark=False)
                found["deterministic_graphed_vs_eager"] = compare(runs["graphed"], runs["eager"])
                found["deterministic_graphed_vs_eager_capturable"] = compare(runs["graphed"], runs["eager_capturable"])
                found["deterministic_eager_capturable_vs_eager"] = compare(runs["eager_capturable"], runs["eager"])
        finally:
            torch.use_deterministic_algorithms(False)
        found["determinism_warnings"] = sorted(
            {str(w.message)[:200] for w in caught if "deterministic" in str(w.message)}
        )
    if cuda:  # cudnn.benchmark on: what train runs
        eager = twenty_steps(check, batch, steps, "off", benchmark=True)
        found["benchmark_eager_vs_eager"] = compare(twenty_steps(check, batch, steps, "off", benchmark=True), eager)
        found["benchmark_graphed_vs_eager"] = compare(twenty_steps(check, batch, steps, "on", benchmark=True), eager)
    else:
        found["graphed"] = "skipped: no CUDA"
    return found


def twenty_steps(check: Check, batch: int, steps: int, graphs: str, benchmark: bool, capturable: bool = False) -> dict:
    """Weights, EMA, optimizer state and stat sums after `steps` steps from seed 0 (bench's networks, with an EMA)."""
    import torch

    from gan.step import set_capturable
    from job.commands.bench import bench_stepper

    stepper, run = bench_stepper(check.device, batch, "fp32", graphs, ema_decay=0.999)
    torch.backends.cudnn.benchmark = benchmark  # after bench_stepper's prepare_cuda, before the first convolution
    if capturable:
        for optimizer in (stepper.optimizer_g, stepper.optimizer_d):
            set_capturable(optimizer, True)
    run(steps)
    tensors = {"sums": stepper.sums}
    for prefix, item in (("g", stepper.generator), ("d", stepper.discriminator), ("ema", stepper.ema.module)):
        tensors.update({f"{prefix}.{k}": v for k, v in item.state_dict().items()})
    for prefix, optimizer in (("adam_g", stepper.optimizer_g), ("adam_d", stepper.optimizer_d)):
        for index, state in optimizer.state_dict()["state"].items():
            tensors.update({f"{prefix}.{index}.{k}": v for k, v in state.items()})
    return {name: value.detach().to("cpu", copy=True) for name, value in tensors.items()}


def compare(a: dict, b: dict) -> dict:
    """Whether two runs' tensors are bitwise equal, and where not, the largest difference."""
    import torch

    differing = [name for name in a if not torch.equal(a[name], b[name])]
    largest = max((float((a[n].double() - b[n].double()).abs().max()) for n in differing), default=0.0)
    return {"bitwise_equal": not differing, "tensors": len(a), "differing": len(differing),
            "first_differing": differing[:5], "max_abs_diff": largest}  # fmt: skip


# Stage 4 --------------------------------------------------------------------------------------------


def synthetic_mnist(folder: Path, num_train: int, num_test: int) -> Path:
    """Four IDX files of MNIST's shape, random pixels and labels (the real data does not fit beside the packed Ray)."""
    import torch

    from gan.data import IDX_FILES
    from gan.idx import write_idx

    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(0)
    for split, count in (("train", num_train), ("test", num_test)):
        write_idx(
            folder / IDX_FILES[f"{split}_images"],
            torch.randint(0, 256, (count, 28, 28), generator=rng, dtype=torch.uint8),
        )
        write_idx(
            folder / IDX_FILES[f"{split}_labels"], torch.randint(0, 10, (count,), generator=rng, dtype=torch.uint8)
        )
    return folder


def stage_full_loop(check: Check) -> dict:
    import torch

    from job.config import TrainConfig
    from job.runtime.loop import run_worker
    from job.storage.location import resolve_location

    cuda = check.device.type == "cuda"
    data = synthetic_mnist(check.work / "mnist", *((512, 200) if check.quick else (MNIST_TRAIN, MNIST_TEST)))
    found: dict = {"data": "synthetic, MNIST's shape" if not check.quick else "synthetic, 512 + 200 images"}
    for graphs in ("off", "on") if cuda else ("off",):
        config = TrainConfig(
            data="mnist",
            data_dir=str(data),
            epochs=3,
            batch_size=256,
            storage=str(check.work / "runs"),
            run_name=f"loop-{graphs}",
            eval_every=1,
            eval_num=64 if check.quick else 2000,
            checkpoint_every=1,
            use_gpu=cuda,
            cuda_graphs=graphs,
            cpus_per_worker=None if cuda else 1,
        )
        session = TimedSession(
            resolve_location(config.storage).child(config.run_name), check.device, config.keep_checkpoints
        )
        start_s = time.perf_counter()
        run_worker(config, session)
        if cuda:
            torch.cuda.synchronize()
        metrics = check.work / "runs" / config.run_name / "artifacts" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        walls = [round(b - a, 3) for a, b in zip([start_s, *session.reported_at], session.reported_at)]
        found[f"graphs_{graphs}"] = {
            "run_s": round(time.perf_counter() - start_s, 2),
            # from the previous epoch's report to this one's: steps, evaluation, grid, checkpoint, report
            "epoch_wall_s": walls,
            "rows": [
                {k: v for k, v in row.items() if k.endswith("_s") or k in ("epoch", "step", "images_per_s")}
                for row in rows
            ],
        }
    found["goal"] = "epochs 2 and 3 of graphs_on: epoch_wall_s <= 0.5 s each (one H100/H200, batch 256)"
    return found


class TimedSession:
    """LocalSession, noting when each epoch's report came: the epoch's whole wall time, recording included."""

    def __init__(self, run, device, keep_checkpoints: int) -> None:
        from job.runtime.local_session import LocalSession

        self.inner = LocalSession(run, device, keep_checkpoints)
        self.rank, self.world_size, self.node_id = 0, 1, "local"
        self.run, self.device = run, device
        self.reported_at: list[float] = []

    def load_checkpoint(self):
        return self.inner.load_checkpoint()

    def stream(self) -> None:
        return None  # the images in memory, as the epoch's timing is of the step

    def report(self, metrics: dict, checkpoint_dir) -> None:
        self.inner.report(metrics, checkpoint_dir)
        self.reported_at.append(time.perf_counter())


# Stage 5 --------------------------------------------------------------------------------------------


def stage_syncs(check: Check) -> dict:
    import torch

    from gan.data import shard_indices
    from gan.epoch import train_epoch
    from job.commands.bench import bench_stepper

    if check.device.type != "cuda":
        return {"skipped": "no CUDA: sync debug mode watches CUDA only"}
    images = torch.randint(0, 256, (MNIST_TRAIN, 1, 28, 28), dtype=torch.uint8)
    found = {}
    for graphs in ("off", "on"):
        stepper, _ = bench_stepper(check.device, 256, "fp32", graphs, images_u8=images, ema_decay=0.999)
        # warm-up and capture, outside the count
        train_epoch(stepper, shard_indices(MNIST_TRAIN, 0, 1, 1, 0)[: 256 * 8], 256)
        indices = shard_indices(MNIST_TRAIN, 0, 1, 2, 0)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                totals = train_epoch(stepper, indices, 256)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        totals.sums.tolist()  # the loop's one wait per epoch, outside the count
        places: dict[str, int] = {}
        for warning in caught:
            if "synchroniz" in str(warning.message):
                where = f"{Path(warning.filename).name}:{warning.lineno}"
                places[where] = places.get(where, 0) + 1
        found[f"graphs_{graphs}"] = {"steps": totals.steps, "syncs": sum(places.values()), "where": places}
    return found


# Stage 6 --------------------------------------------------------------------------------------------


def stage_ray_train(check: Check) -> dict:
    cuda = check.device.type == "cuda"
    found: dict = {"ddp_world_size_1": ddp_world_size_one(check)}
    check.results["stages"]["6_ray_train"] = {"status": "running", **found}
    check.write()  # the in-process half is kept even if the Ray half overruns the slot

    data = synthetic_mnist(check.work / "mnist-ray", *((128, 64) if check.quick else (MNIST_TRAIN, MNIST_TEST)))
    storage = check.work / "ray-runs"
    common = ["--data", "mnist", "--data-dir", str(data), "--storage", str(storage), "--run-name", "ray-gpu",
              "--eval-every", "0", "--num-workers", "1", "--max-failures", "0"]  # fmt: skip
    if cuda:
        common += ["--use-gpu", "--cuda-graphs", "on", "--batch-size", "256"]
    else:
        common += ["--batch-size", "32", "--cpus-per-worker", "1"]
    env = check.job_env(**({"RAY_ADDRESS": check.args.ray_address} if check.args.ray_address else {}))
    for attempt, epochs in (("first", 1), ("resumed", 2)):
        timeout_s = max(10.0, check.left_s() - 5)
        start_s = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "job", "train", *common, "--epochs", str(epochs)],
                env=env,
                cwd=check.work,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            outcome = {"exit": done.returncode, "output_tail": (done.stdout + done.stderr)[-2500:]}
        except subprocess.TimeoutExpired as err:
            outcome = {"exit": "timeout", "output_tail": str(err.output or "")[-2500:]}
        outcome["wall_s"] = round(time.perf_counter() - start_s, 1)
        metrics = storage / "ray-gpu" / "artifacts" / "metrics.jsonl"
        outcome["rows"] = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        found[f"ray_{attempt}"] = outcome
        check.results["stages"]["6_ray_train"] = {"status": "running", **found}
        check.write()
        if outcome["exit"] != 0:
            raise RuntimeError(
                f"the Ray Train run ({attempt}) ended with {outcome['exit']}; see ray_{attempt}.output_tail"
            )
    resumed_rows = found["ray_resumed"]["rows"]
    found["resumed_ok"] = [r["epoch"] for r in resumed_rows] == [1, 2] and resumed_rows[1].get("resumed", {}).get(
        "from_epoch"
    ) == 1
    return found


def ddp_world_size_one(check: Check) -> dict:
    """The graphed step under DDP forced on over a world-size-1 group (NCCL on a GPU),
    and the project's collectives over it."""
    import torch
    import torch.distributed as dist

    import job.runtime.distributed as distributed
    from gan.stepper import DDP_WARMUP_STEPS, Stepper
    from job.commands.bench import bench_stepper

    cuda = check.device.type == "cuda"
    backend = distributed.backend_for(cuda)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # what Ray Train sets: capture must work with it
    if cuda:
        torch.cuda.set_device(check.device)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    found: dict = {"backend": backend, "async_error_handling": os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"]}
    try:
        batch, steps = (16, 4) if check.quick else (256, DDP_WARMUP_STEPS + 9)
        graphs = "on" if cuda else "off"
        results = {}
        for wrapped in (False, True):
            plain, run = bench_stepper(check.device, batch, "fp32", graphs, ema_decay=0.999)
            stepper = plain
            if wrapped:
                stream = plain.stream
                generator = distributed.wrap_ddp(plain.generator, check.device, stream, force=True)
                discriminator = distributed.wrap_ddp(plain.discriminator, check.device, stream, force=True)
                stepper = Stepper(
                    generator,
                    discriminator,
                    plain.optimizer_g,
                    plain.optimizer_d,
                    plain.images_u8,
                    plain.noise_dim,
                    plain.amp_dtype,
                    plain.ema,
                    cuda_graphs=plain.cuda_graphs,
                    warmup_steps=DDP_WARMUP_STEPS,
                    stream=stream,
                )
            batches = torch.arange(plain.images_u8.shape[0], device=check.device).split(batch)
            for index in range(steps):
                stepper.step(batches[index % len(batches)])
            results[wrapped] = {
                "sums": stepper.sums.cpu(),
                **{k: v.cpu() for k, v in plain.generator.state_dict().items()},
            }
            if wrapped:
                found["ddp_graphs_captured"] = sorted(stepper.graphs)
        found["ddp_vs_plain"] = compare(results[True], results[False])

        # The project's multi-rank helpers, forced past their one-rank shortcut, over this group.
        real_is_distributed = distributed.is_distributed
        distributed.is_distributed = lambda: True
        try:
            from gan.models import parameter_digest
            from job.runtime.state import rng_state

            mean = distributed.mean_across_ranks(torch.arange(4.0, device=check.device))
            found["mean_across_ranks"] = mean.tolist()
            found["gather_objects"] = [sorted(s) for s in distributed.gather_objects(rng_state())]
            found["broadcast_object"] = distributed.broadcast_object({"from": "rank 0"})
            found["parameter_digest"] = parameter_digest(plain.generator)
        finally:
            distributed.is_distributed = real_is_distributed
    finally:
        dist.destroy_process_group()
    return found


if __name__ == "__main__":
    sys.exit(main())
