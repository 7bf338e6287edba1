#!/usr/bin/env bash
# Runs the training job on this machine the way KubeRay runs it: a Ray head of its own on
# loopback, the knobs and the entrypoint of the RayJob in the built overlay, `ray job submit`,
# the logs followed to the end, the head stopped. Run it from anywhere; it uses the repository
# it lives in as the job's working dir.
#
#   deploy/run-local.sh                          # local overlay's knobs, runs in ./runs/
#   deploy/run-local.sh --s3                     # ... with checkpoints in a local S3 endpoint
#   deploy/run-local.sh --autoscaling            # ... on an autoscaling cluster shaped like the
#                                                # overlay's standing RayCluster (0-CPU head, worker
#                                                # nodes started on demand; deploy/fake_cluster.py)
#   deploy/run-local.sh --run-name my-run        # same name again = resume
#   GAN_JOB_EPOCHS=1 deploy/run-local.sh         # a knob from the environment wins
#
# Needs: ray (and the package's dependencies) in the active Python environment, kubectl (for
# `kubectl kustomize`); --s3 also needs moto_server (the dev extra moto[server]).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/run-local.sh [--overlay NAME] [--run-name NAME] [--s3] [--num-cpus N | --autoscaling]
  --overlay NAME   overlay whose RayJob and knobs to use (default: local)
  --run-name NAME  run name, as the RayJob's name is on Kubernetes (default: local-<timestamp>)
  --s3             start an S3 endpoint on loopback (moto_server) and keep the run there;
                   without it, runs go to ./runs unless GAN_JOB_STORAGE or AWS_ENDPOINT_URL is set
  --num-cpus N     CPUs of the local Ray head (default: all)
  --autoscaling    instead of one head with every CPU: a 0-CPU head whose autoscaler starts worker
                   nodes (each its own raylet here) as the overlay's standing RayCluster defines
                   them, and removes them after 60 idle seconds
EOF
}

overlay=local
run_name="local-$(date +%Y%m%d-%H%M%S)"
start_s3=false
num_cpus=""
autoscaling=false
while [ $# -gt 0 ]; do
    case "$1" in
        --overlay) overlay="${2:?--overlay needs a name}"; shift 2 ;;
        --run-name) run_name="${2:?--run-name needs a name}"; shift 2 ;;
        --s3) start_s3=true; shift ;;
        --num-cpus) num_cpus="${2:?--num-cpus needs a number}"; shift 2 ;;
        --autoscaling) autoscaling=true; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "run-local.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ "$autoscaling" = true ] && [ -n "$num_cpus" ]; then
    echo "run-local.sh: --num-cpus and --autoscaling exclude each other (the autoscaling cluster's CPUs come from the overlay)" >&2
    exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for tool in ray kubectl; do
    if ! command -v "$tool" >/dev/null; then
        echo "run-local.sh: $tool not found on PATH (activate the project's environment; kubectl builds the overlay)" >&2
        exit 2
    fi
done
# The driver's `python` must be the one next to `ray`.
PATH="$(dirname "$(command -v ray)"):$PATH"
export PATH

# The RayJob's entrypoint and the knobs ConfigMap it loads, from the built overlay.
manifest="$(kubectl kustomize "$repo/deploy/overlays/$overlay")"
read_manifest() {
    MANIFEST="$manifest" python - "$@" <<'EOF'
import os, shlex, sys
import yaml

docs = [d for d in yaml.safe_load_all(os.environ["MANIFEST"]) if d]
rayjob = next(d for d in docs if d["kind"] == "RayJob")
if sys.argv[1] == "entrypoint":
    print(rayjob["spec"]["entrypoint"])
else:  # the GAN_JOB_* knobs of the ConfigMaps the head loads, as shell assignments
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    names = {s["configMapRef"]["name"] for s in head.get("envFrom", []) if "configMapRef" in s}
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] in names:
            for key, value in doc.get("data", {}).items():
                if key.startswith("GAN_JOB_"):
                    print(f"{key}={shlex.quote(value)}")
EOF
}
entrypoint="$(read_manifest entrypoint)"

# A knob already in the environment wins over the manifest's.
caller_storage="${GAN_JOB_STORAGE:-}"
while IFS='=' read -r key value; do
    if [ -z "${!key+set}" ]; then
        eval "export $key=$value"
    fi
done < <(read_manifest knobs)

tmp="$(mktemp -d "${TMPDIR:-/tmp}/gan-ray.XXXXXX")"
head_pid=""
s3_pid=""
cleanup() {
    # Stop only what this script started: `ray stop` would stop every Ray on the machine.
    if [ -n "$head_pid" ]; then kill -TERM "$head_pid" 2>/dev/null || true; wait "$head_pid" 2>/dev/null || true; fi
    if [ -n "$s3_pid" ]; then kill -TERM "$s3_pid" 2>/dev/null || true; wait "$s3_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

free_ports() {
    python - "$1" <<'EOF'
import socket, sys

sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
EOF
}
read -r gcs_port dashboard_port client_port node_manager_port object_manager_port \
    agent_listen_port agent_grpc_port runtime_env_port metrics_port s3_port <<<"$(free_ports 10)"

wait_for_http() {  # URL SECONDS: until the URL answers
    python - "$1" "$2" <<'EOF'
import sys, time, urllib.request

deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        break
    except Exception as err:
        if getattr(err, "code", None):  # any HTTP answer: the server is up
            break
        if time.monotonic() > deadline:
            sys.exit(f"run-local.sh: {sys.argv[1]} did not come up")
        time.sleep(0.5)
EOF
}

if [ "$start_s3" = true ]; then
    if ! command -v moto_server >/dev/null; then
        echo "run-local.sh: --s3 needs moto_server (pip install 'moto[server]')" >&2
        exit 2
    fi
    moto_server -H 127.0.0.1 -p "$s3_port" >"$tmp/s3.log" 2>&1 &
    s3_pid=$!
    wait_for_http "http://127.0.0.1:$s3_port/" 30
    export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port" AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local
    export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
    # The endpoint starts empty: the job creates the storage bucket.
    export GAN_JOB_CREATE_BUCKET=true
    echo "run-local.sh: S3 endpoint $AWS_ENDPOINT_URL (gone when this script ends)"
elif [ -z "$caller_storage" ] && [ -z "${AWS_ENDPOINT_URL:-}" ]; then
    # No S3 named: keep the run in a folder rather than in the manifest's bucket (absolute: the
    # driver runs in Ray's copy of the repository).
    export GAN_JOB_STORAGE="$repo/runs"
fi

# Token authentication, as on Kubernetes (Ray 2.60 turns it on for new local clusters anyway):
# a token of this run's own, for the head, the driver and `ray job submit`, leaving
# ~/.ray/auth_token alone.
RAY_AUTH_TOKEN="$(python -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN

# The driver inherits this environment from the head, as on Kubernetes from the head pod.
if [ "$autoscaling" = true ]; then
    # Ray's fake multi-node provider: the classic autoscaler starts and removes worker nodes.
    python "$repo/deploy/fake_cluster.py" --overlay "$overlay" --env-file "$tmp/cluster.env" >"$tmp/head.log" 2>&1 &
    head_pid=$!
    for _ in $(seq 300); do
        [ -f "$tmp/cluster.env" ] || ! kill -0 "$head_pid" 2>/dev/null && break
        sleep 0.5
    done
    if [ ! -f "$tmp/cluster.env" ]; then
        cat "$tmp/head.log" >&2
        exit 1
    fi
    # shellcheck disable=SC1091 # written by fake_cluster.py: RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_*
    . "$tmp/cluster.env"
    address="$RAY_API_SERVER_ADDRESS"
    gcs_port="${RAY_ADDRESS##*:}"
    unset RAY_ADDRESS
    head -n 1 "$tmp/head.log"
else
    head_args=(--head --block --disable-usage-stats --temp-dir "$tmp/ray"
        --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1
        --port "$gcs_port" --dashboard-port "$dashboard_port" --ray-client-server-port "$client_port"
        --node-manager-port "$node_manager_port" --object-manager-port "$object_manager_port"
        --dashboard-agent-listen-port "$agent_listen_port" --dashboard-agent-grpc-port "$agent_grpc_port"
        --runtime-env-agent-port "$runtime_env_port" --metrics-export-port "$metrics_port"
        --min-worker-port 0 --max-worker-port 0)
    if [ -n "$num_cpus" ]; then head_args+=(--num-cpus "$num_cpus"); fi
    ray start "${head_args[@]}" >"$tmp/head.log" 2>&1 &
    head_pid=$!
    address="http://127.0.0.1:$dashboard_port"
    if ! wait_for_http "$address/api/version" 120; then
        cat "$tmp/head.log" >&2
        exit 1
    fi
fi
echo "run-local.sh: Ray head at $address, run $run_name, storage ${GAN_JOB_STORAGE:-default}"

# The entrypoint goes through a shell, as in KubeRay's submitter, where RAYJOB_NAME is the
# RayJob's name; here it is the run name. `ray job submit` follows the logs and fails if the job does.
# RAY_ADDRESS pins the job's Ray processes to this head when other Ray instances run on the machine.
export RAYJOB_NAME="$run_name"
runtime_env="{\"env_vars\": {\"RAY_ADDRESS\": \"127.0.0.1:$gcs_port\"}, \"excludes\": [\".git\", \".venv\", \"runs\"]}"
submit=(ray job submit --address "$address" --submission-id "$run_name-$(date +%s)")
if [ "$autoscaling" = true ]; then
    # No --working-dir: the fake nodes share the head's temp dir, and when their runtime-env agents
    # clean up they remove the unpacked working dir under a driver that still runs in it. The job
    # runs the package installed in this environment (pip install -e: this checkout), as a
    # KubeRay cluster runs the one in its image.
    runtime_env="{\"env_vars\": {\"RAY_ADDRESS\": \"127.0.0.1:$gcs_port\"}}"
else
    submit+=(--working-dir "$repo")
fi
submit+=(--runtime-env-json "$runtime_env" --)
eval "$(printf '%q ' "${submit[@]}") $entrypoint"
