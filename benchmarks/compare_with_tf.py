"""Side by side on this machine: the tutorial's TensorFlow `train_step` and `gan-job bench`.

Runs the two in alternating rounds (so that both see the same machine state) and prints each
round's images/s and, last, one JSON line with the medians and their ratio. TensorFlow lives in a
scratch venv, never in this project's dependencies:

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    .venv/bin/python benchmarks/compare_with_tf.py --tf-python /tmp/tfvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def last_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-python", default="/tmp/tfvenv/bin/python", help="python of the venv with tensorflow-cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--bench-args", default="", help="extra flags for gan-job bench, e.g. '--precision fp32'")
    args = parser.parse_args()

    tf_command = [
        args.tf_python,
        str(HERE / "tf_tutorial_step.py"),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
    ]
    ours_command = [
        sys.executable,
        "-m",
        "job",
        "bench",
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        *args.bench_args.split(),
    ]
    tf_rates, our_rates = [], []
    for round_index in range(1, args.rounds + 1):
        tf_rates.append(last_json(tf_command)["images_per_s"])
        ours = last_json(ours_command)
        our_rates.append(ours["images_per_s"])
        print(
            f"round {round_index}: tensorflow {tf_rates[-1]:.0f} img/s, "
            f"gan-job {our_rates[-1]:.0f} img/s ({ours['precision']})",
            flush=True,
        )
    tf_median, our_median = statistics.median(tf_rates), statistics.median(our_rates)
    print(json.dumps({
        "batch_size": args.batch_size, "tensorflow_images_per_s": tf_median, "gan_job_images_per_s": our_median,
        "ratio": round(our_median / tf_median, 2), "bench_args": args.bench_args,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
