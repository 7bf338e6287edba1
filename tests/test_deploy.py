"""The deployment: the Dockerfile and deploy/ (kustomize overlays of KubeRay and Kubernetes objects).

No cluster runs here. Each overlay is built once with `kubectl kustomize`; its objects are checked
against the KubeRay CRD schemas (the folder in $KUBERAY_CRD_SCHEMAS, else ../shared/kuberay-crds,
else the copy in tests/fixtures) and the Kubernetes schemas (offline,
kubernetes-validate), against the package (Ray version, CLI flags, knobs), and for security
(container lockdown, checkov, hadolint, shellcheck). Entrypoints and scripts run in bash against a
stand-in `ray` that records what would be submitted.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import built_overlay

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
# The KubeRay CRD YAMLs: the folder the variable names (read here, relative to the working
# directory), else ../shared/kuberay-crds beside the repository, else the copy in tests/fixtures
# (KubeRay's CRDs at the commit its SOURCE file names, 36 kB packed), so these tests never skip.
CRD_SCHEMAS_VARIABLE = "KUBERAY_CRD_SCHEMAS"
CRD_SCHEMAS_GIVEN = os.environ.get(CRD_SCHEMAS_VARIABLE, "")
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"
VENDORED_CRDS = REPO / "tests" / "fixtures" / "kuberay-crds.tar.xz"
OVERLAYS = sorted(path.parent.name for path in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
# The oldest Kubernetes the manifests are written for (CronJob timeZone, the batch.kubernetes.io/job-name label).
KUBERNETES_VERSION = "1.30.0"
RAY_GROUP = "ray.io"
FAST_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
# The knobs a run on a cluster cannot do without: the default storage is a folder inside the pod.
REQUIRED_KNOBS = ("GAN_JOB_STORAGE", "GAN_JOB_NUM_WORKERS", "GAN_JOB_CPUS_PER_WORKER")
# What KubeRay sets from a cluster's token Secret in its Ray containers and submitters, beyond the manifests.
KUBERAY_SECRET_VARIABLES = ("RAY_AUTH_TOKEN",)
# A shell line that only assigns a variable (`NAME=value`, `export NAME=value`): no program, no argv.
SHELL_ASSIGNMENT = re.compile(
    r"""(?:export\s+)?[A-Za-z_]\w*=(?:"(?:[^"`$\\]|\$(?!\())*"|'[^']*'|(?:[^\s"'`$;&|<>()\\]|\$(?!\())*)"""
)
# The pod labels of KubeRay's operator as its Helm chart sets them (the release of deploy/README.md).
KUBERAY_OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}
# The image's hash-pinned requirements (deploy/image/pin_requirements.py writes them).
REQUIREMENTS = (DEPLOY / "image" / "requirements.txt", DEPLOY / "image" / "requirements-gpu.txt")

# Checkov findings accepted on purpose, each with its reason: (check id, resource or "*") -> why.
# A finding not listed fails the test, and so does an entry that no longer matches anything.
CHECKOV_ACCEPTED = {
    ("CKV_K8S_43", "*"): (
        "Image should use digest: images are pinned to exact release tags (gan-job's tag is the Ray "
        "version); gan-job's digest exists only once an image is pushed, so pin digests per "
        "registry with the overlay's `images: digest:` or an admission policy."
    ),
    ("CKV_K8S_15", "*"): (
        "Image pull policy Always: the tags are immutable releases, and on kind the gan-job image is "
        "loaded into the node (`kind load docker-image`), where Always would fail to pull it."
    ),
    ("CKV_K8S_35", "*"): (
        "Secrets as files rather than env: the consumers read credentials from environment variables "
        "only (AWS SDK and pyarrow: AWS_*; Ray: RAY_AUTH_TOKEN; MinIO: MINIO_ROOT_*), and the values "
        "come from Secrets (secretKeyRef/envFrom), never from literals."
    ),
    ("CKV_K8S_40", "CronJob.gan-job.gan-retrain"): (
        "High UID: the CronJob runs the gan-job image as its own user, uid 1000 (`ray` in Ray's "
        "image, owner of its Python environment), like the Ray pods checkov does not see."
    ),
}


# Building and reading the manifests.


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request) -> list[dict]:
    """A private copy of one overlay's objects (tests may not see each other's changes)."""
    return copy.deepcopy(list(built_overlay(request.param)))


@functools.cache
def examples() -> tuple[dict, ...]:
    """The example objects (`*.example.yaml`) that overlays reference but do not apply."""
    return tuple(yaml.safe_load(path.read_text()) for path in sorted(DEPLOY.rglob("*.example.yaml")))


def named(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [obj for obj in objs if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name)]


def pod_specs(node: object) -> Iterator[dict]:
    """Every pod spec in an object, wherever it is nested (a dict with a list of containers)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_specs(value)


def containers(obj: dict) -> Iterator[tuple[dict, dict]]:
    """(pod spec, container) for every container and init container of an object."""
    for pod in pod_specs(obj):
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            yield pod, container


def rayjob_specs(obj: dict) -> list[dict]:
    """The RayJob specs in an object: a RayJob's own, a RayCronJob's template."""
    if obj["kind"] == "RayJob":
        return [obj["spec"]]
    if obj["kind"] == "RayCronJob":
        return [obj["spec"]["jobTemplate"]]
    return []


def raycluster_specs(obj: dict) -> list[dict]:
    """The RayCluster specs in an object: a RayCluster's own, or inside a RayJob (template)."""
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    return [spec["rayClusterSpec"] for spec in rayjob_specs(obj) if "rayClusterSpec" in spec]


def ray_containers(objs: list[dict]) -> Iterator[tuple[str, dict]]:
    """("head" or "worker", container) for the Ray container of every Ray pod template."""
    for obj in objs:
        for cluster in raycluster_specs(obj):
            yield "head", cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
            for group in cluster.get("workerGroupSpecs", []):
                yield "worker", group["template"]["spec"]["containers"][0]


def object_data(objs: list[dict], kind: str, name: str) -> dict[str, str] | None:
    """The keys and values of a ConfigMap or Secret in the build, else in an example file."""
    for obj in named(objs, kind, name) or named(list(examples()), kind, name):
        return {**obj.get("data", {}), **obj.get("stringData", {})}
    return None


def container_env(container: dict, objs: list[dict]) -> dict[str, tuple]:
    """Where each environment variable of a container comes from:
    ("value", v), ("secret", name, key), ("configMap", name, key, value) or ("field", path)."""
    env: dict[str, tuple] = {}
    for source in container.get("envFrom", []):
        for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if ref in source:
                name = source[ref]["name"]
                data = object_data(objs, kind, name)
                assert data is not None, f"{container['name']}: envFrom {kind} {name} is neither built nor an example"
                for key, value in data.items():
                    env[key] = ("configMap", name, key, value) if kind == "ConfigMap" else ("secret", name, key)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = ("value", var["value"])
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = (
                "secret",
                var["valueFrom"]["secretKeyRef"]["name"],
                var["valueFrom"]["secretKeyRef"]["key"],
            )
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = (
                "configMap",
                ref["name"],
                ref["key"],
                (object_data(objs, "ConfigMap", ref["name"]) or {}).get(ref["key"]),
            )
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = ("field", var["valueFrom"]["fieldRef"]["fieldPath"])
    return env


def knobs(objs: list[dict]) -> dict[str, str]:
    """The GAN_JOB_* values that the Ray head containers (where the driver runs) get."""
    values: dict[str, str] = {}
    for role, container in ray_containers(objs):
        if role == "head":
            for name, source in container_env(container, objs).items():
                if name.startswith("GAN_JOB_"):
                    values[name] = source[-1]
    return values


def pyproject_ray_version() -> str:
    """X of the requirement "ray[...]==X" in pyproject.toml."""
    pins = re.findall(r"""["']ray\[[^\]]*\]\s*==\s*([\w.]+)["']""", (REPO / "pyproject.toml").read_text())
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once (ray[...]==X), found {pins}"
    return pins[0]


def dockerfile_args() -> dict[str, str]:
    """The ARG defaults of the Dockerfile."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE))


def tool(name: str) -> str:
    """A command-line tool: the path in the variable <NAME> (e.g. CHECKOV), else next to this
    Python (the project's environment), else in the repo's own .venv-<name> (checkov's
    dependency pins clash with the project's, so it gets a venv of its own), else on PATH."""
    own_venv = REPO / f".venv-{name}" / "bin" / name
    for candidate in (os.environ.get(name.upper()), Path(sys.executable).parent / name, own_venv, shutil.which(name)):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail(f"{name} not found: set {name.upper()} to its path, or install it next to {sys.executable} or on PATH")


# Running entrypoints and scripts against a stand-in `ray`.

FAKE_RAY = """#!/usr/bin/env bash
# Records the arguments of each call (one a line, then a blank line); `ray job status ID`
# succeeds for the ids listed in $EXISTING_SUBMISSIONS.
for arg in "$@"; do printf '%s\\n' "$arg"; done >> "$RAY_CALLS"
echo >> "$RAY_CALLS"
if [ "$1 $2" = "job status" ]; then grep -qxF -- "${@: -1}" "$EXISTING_SUBMISSIONS"; fi
"""


def run_with_fake_ray(
    tmp_path: Path, script: str, env: dict[str, str], existing: tuple[str, ...] = ()
) -> list[list[str]]:
    """Runs a bash script with `ray` replaced by a recorder; returns the recorded `ray` calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    calls, existing_file = tmp_path / "calls", tmp_path / "existing"
    calls.write_text("")
    existing_file.write_text("".join(f"{sid}\n" for sid in existing))
    full_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_CALLS": str(calls),
        "EXISTING_SUBMISSIONS": str(existing_file),
        **env,
    }
    result = subprocess.run(["bash", "-c", script], env=full_env, check=False, capture_output=True, text=True)
    assert result.returncode == 0, f"script failed:\n{script}\n{result.stderr}"
    return [block.split("\n") for block in calls.read_text().strip("\n").split("\n\n") if block]


def submitted(calls: list[list[str]]) -> tuple[str, str]:
    """(submission id, the driver's command) of the one `ray job submit` among the calls.

    Ray 2.60 joins the words after `--` with shlex.join: that string is what the driver's shell runs."""
    submits = [call for call in calls if call[:2] == ["job", "submit"]]
    assert len(submits) == 1, f"expected one `ray job submit`, got {calls}"
    call = submits[0]
    words = call[call.index("--") + 1 :]
    submission_id = call[call.index("--submission-id") + 1] if "--submission-id" in call else ""
    return submission_id, shlex.join(words)


# The submitter's environment carries a GAN_JOB_STORAGE of its own in these tests, which the driver
# must not use: the storage is the head's knob (a submitter pod has no knobs at all).
SUBMITTER_STORAGE = "s3://not-the-heads-bucket/runs"


def kuberay_submit(tmp_path: Path, entrypoint: str, rayjob_name: str) -> str:
    """The driver's command when KubeRay's submitter submits a RayJob's entrypoint.

    KubeRay (K8sJobMode) runs `ray job submit ... -- <entrypoint>` in bash, with RAYJOB_NAME set
    from the submitter Job's name, which is the RayJob's name."""
    script = f"ray job submit --address http://head:8265 --submission-id {rayjob_name}-x1y2z --no-wait -- {entrypoint}"
    return submitted(
        run_with_fake_ray(tmp_path, script, {"RAYJOB_NAME": rayjob_name, "GAN_JOB_STORAGE": SUBMITTER_STORAGE})
    )[1]


FAKE_PYTHON = """#!/usr/bin/env bash
# Records the arguments of each call (one a line, then a blank line).
for arg in "$@"; do printf '%s\\n' "$arg"; done >> "$PYTHON_CALLS"
echo >> "$PYTHON_CALLS"
"""


def on_the_head(tmp_path: Path, driver_command: str, head_env: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs a driver command as Ray's job manager on the head does (`sh -c`, the head's environment:
    `head_env`, the knobs), with `python` replaced by a recorder; `.calls` holds the `python` calls."""
    bin_dir = tmp_path / "head-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    calls = tmp_path / "python-calls"
    calls.write_text("")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON_CALLS": str(calls), **head_env}
    result = subprocess.run(["sh", "-c", driver_command], env=env, check=False, capture_output=True, text=True)
    result.calls = [block.split("\n") for block in calls.read_text().strip("\n").split("\n\n") if block]
    return result


def job_commands(tmp_path: Path, driver_command: str, head_env: dict[str, str]) -> list[list[str]]:
    """The `python -m job ...` commands a driver command runs on a head with `head_env` (the knobs)."""
    result = on_the_head(tmp_path, driver_command, head_env)
    assert result.returncode == 0, f"the driver command failed on the head:\n{driver_command}\n{result.stderr}"
    return [["python", *call] for call in result.calls]


def driver_commands(
    objs: list[dict], tmp_path: Path, rayjob_name: str = "gan-train", firing: str = "gan-retrain-29000000"
) -> dict[str, str]:
    """{where: the driver's command} for every RayJob, RayCronJob template and CronJob of an overlay."""
    commands = {}
    for obj in objs:
        for spec in rayjob_specs(obj):
            commands[f"{obj['kind']} {obj['metadata']['name']}"] = kuberay_submit(
                tmp_path, spec["entrypoint"], rayjob_name
            )
        if obj["kind"] == "CronJob":
            calls = run_with_fake_ray(
                tmp_path, cronjob_script(obj), {"FIRING": firing, "GAN_JOB_STORAGE": SUBMITTER_STORAGE}
            )
            commands[f"CronJob {obj['metadata']['name']}"] = submitted(calls)[1]
    return commands


def run_name_of(command: list[str]) -> str:
    """The run a `train` command names, or the sweep a `tune` command names (a retry resumes either)."""
    flag = "--sweep" if command[3] == "tune" else "--run-name"
    assert flag in command, f"{shlex.join(command)} names no {flag[2:]}"
    return command[command.index(flag) + 1]


def cronjob_script(cronjob: dict) -> str:
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["bash", "-c"], "the CronJob runs its script with bash -c"
    return container["args"][0]


# Schemas.


@pytest.fixture(scope="module")
def crds(tmp_path_factory) -> Path:
    """The folder of KubeRay CRD YAMLs: the one asked for, else ../shared's,
    else the copy in tests/fixtures unpacked."""
    if CRD_SCHEMAS_GIVEN:
        folder = Path(CRD_SCHEMAS_GIVEN).expanduser().resolve()
        if not sorted(folder.glob("*.yaml")):
            problem = "has no CRD YAMLs (*.yaml)" if folder.is_dir() else "is not a folder"
            pytest.fail(f"{CRD_SCHEMAS_VARIABLE}={CRD_SCHEMAS_GIVEN}: {folder} {problem}", pytrace=False)
        return folder
    if sorted(SHARED_CRDS.glob("*.yaml")):
        return SHARED_CRDS
    target = tmp_path_factory.mktemp("crds")
    with tarfile.open(VENDORED_CRDS) as archive:
        archive.extractall(target, filter="data")
    return target / "kuberay-crds"


@functools.cache
def crd_validators(folder: Path) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of the CRD's schema that rejects unknown fields."""
    validators = {}
    for path in sorted(folder.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=FAST_YAML_LOADER)  # 3 MB of schema: the C loader when there is one
        for version in crd["spec"]["versions"]:
            schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            validators[key] = jsonschema.Draft7Validator(schema)
    assert validators, f"no CRD schemas in {folder}"
    return validators


def strict(schema: dict) -> dict:
    """The schema with unknown fields forbidden wherever the CRD lists the fields of an object
    (the API server prunes them; here they are errors), except where it preserves unknown fields."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def crd_errors(obj: dict, crds: Path) -> list[str]:
    validator = crd_validators(crds).get((obj["apiVersion"], obj["kind"]))
    assert validator, f"no CRD schema for {obj['apiVersion']} {obj['kind']} in {crds}"
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(obj)]


def kubernetes_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}"]
    return []


# Tests: the overlays build and validate.


def test_each_overlay_builds_into_ray_objects():
    assert {"local", "cluster"} <= set(OVERLAYS)
    for overlay in OVERLAYS:
        kinds = {obj["kind"] for obj in built_overlay(overlay)}
        assert {"RayJob", "RayCluster"} <= kinds, f"{overlay}: {kinds}"


def test_kuberay_objects_match_the_crd_schemas_strictly(objects, crds):
    ray_objects = [obj for obj in objects if obj["apiVersion"].startswith(RAY_GROUP + "/")]
    assert ray_objects
    for obj in ray_objects:
        errors = crd_errors(obj, crds)
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(errors)


def test_crd_validation_rejects_an_unknown_field(crds):
    rayjob = copy.deepcopy(named(list(built_overlay("local")), "RayJob")[0])
    rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = (
        "Always"
    )
    assert any("imagePullPolicyy" in error for error in crd_errors(rayjob, crds))


def test_kubernetes_objects_match_the_kubernetes_schemas_strictly(objects):
    builtin = [obj for obj in objects if not obj["apiVersion"].startswith(RAY_GROUP + "/")]
    assert builtin
    for obj in builtin + [example for example in examples() if not example["apiVersion"].startswith(RAY_GROUP + "/")]:
        errors = kubernetes_errors(obj)
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(errors)


def test_kubernetes_validation_rejects_an_unknown_field():
    cronjob = copy.deepcopy(named(list(built_overlay("local")), "CronJob")[0])
    cronjob["spec"]["concurrency"] = "Forbid"
    assert kubernetes_errors(cronjob)


def test_every_component_is_built_by_an_overlay():
    used = set()
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())
        used |= {(DEPLOY / "overlays" / overlay / path).resolve() for path in kustomization.get("components", [])}
    components = {path.parent.resolve() for path in (DEPLOY / "components").glob("*/kustomization.yaml")}
    assert components <= used, (
        f"components no overlay builds (so no test validates): {sorted(map(str, components - used))}"
    )


def test_every_object_lives_in_the_job_namespace(objects):
    namespaces = named(objects, "Namespace")
    assert len(namespaces) == 1
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespaces[0]["metadata"]["name"], (
                f"{obj['kind']} {obj['metadata']['name']}"
            )


def test_manifest_files_are_named_kind_dot_variant():
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.name.endswith(".patch.yaml"):
            continue
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert len(docs) == 1, f"{path.relative_to(REPO)}: one object per file"
        assert path.name.split(".")[0] == docs[0]["kind"].lower(), f"{path.relative_to(REPO)} holds a {docs[0]['kind']}"


# Tests: consistency with the package.


def test_ray_version_is_one_in_pyproject_dockerfile_and_manifests(objects):
    ray_version = pyproject_ray_version()
    args = dockerfile_args()
    assert args["RAY_VERSION"] == ray_version, "Dockerfile ARG RAY_VERSION"
    base = re.search(r"^FROM (\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE).group(1)
    base = re.sub(r"\$\{(\w+)\}", lambda match: args.get(match.group(1), match.group(0)), base)
    assert base.startswith(f"rayproject/ray:{ray_version}-py311-"), (
        f"Dockerfile FROM {base}: Ray's own Python 3.11 image"
    )
    cluster_versions = {cluster["rayVersion"] for obj in objects for cluster in raycluster_specs(obj)}
    assert cluster_versions == {ray_version}, f"rayVersion {cluster_versions}"
    tags = {container["image"].rsplit(":", 1)[1] for _, container in ray_containers(objects)}
    assert tags and all(tag in (f"{ray_version}-cpu", f"{ray_version}-gpu") for tag in tags), f"Ray image tags {tags}"


def test_every_image_is_pinned_to_a_release(objects):
    for obj in objects:
        for _, container in containers(obj):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image.split("/")[-1]), f"{image} has no tag"
            assert not image.endswith(":latest"), image


def submitter_containers(objs: list[dict]) -> Iterator[tuple[str, dict]]:
    """(where, container) for every container that only runs `ray job submit`: a RayJob's (or a
    RayCronJob template's) submitter pod, the CronJob's pod."""
    for obj in objs:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        for spec in rayjob_specs(obj):
            for container in spec.get("submitterPodTemplate", {}).get("spec", {}).get("containers", []):
                yield where, container
        if obj["kind"] == "CronJob":
            for container in obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]:
                yield where, container


def gan_job_variant(image: str) -> str | None:
    """ "cpu" or "gpu" for a gan-job image (any registry), None for another image."""
    repository, _, tag = image.partition("@")[0].rpartition(":")
    return tag.rsplit("-", 1)[1] if repository.rsplit("/", 1)[-1] == "gan-job" and "-" in tag else None


def test_gan_job_images_are_the_gpu_variant_exactly_in_the_ray_containers_of_gpu_overlays(objects):
    all_containers = [container for obj in objects for _, container in containers(obj)]
    wants_gpu = any(
        "nvidia.com/gpu" in container.get("resources", {}).get("limits", {}) for container in all_containers
    )
    ray_variants = {gan_job_variant(container["image"]) for _, container in ray_containers(objects)}
    assert ray_variants == ({"gpu"} if wants_gpu else {"cpu"}), "every Ray container on the one image the workers need"
    submitters = {id(container) for _, container in submitter_containers(objects)}
    ray = {id(container) for _, container in ray_containers(objects)}
    others = {gan_job_variant(c["image"]) for c in all_containers if id(c) not in ray and id(c) not in submitters} - {
        None
    }
    assert others <= {"cpu"}, f"gan-job containers outside the Ray clusters: {others}"


@pytest.mark.parametrize("overlay", [name for name in OVERLAYS if name.startswith("cluster")])
def test_cluster_overlays_keep_submitters_on_the_cpu_image_and_ray_containers_on_the_cuda_one(overlay):
    objects = list(built_overlay(overlay))
    ray_images = {container["image"] for _, container in ray_containers(objects)}
    submitter_images = {where: container["image"] for where, container in submitter_containers(objects)}
    assert len(ray_images) == 1 and gan_job_variant(next(iter(ray_images))) == "gpu", ray_images
    kinds = {where.split()[0] for where in submitter_images}
    assert {"RayJob", "CronJob"} <= kinds or {"RayJob", "RayCronJob"} <= kinds, (
        f"a submitter of each kind: {submitter_images}"
    )
    # The same registry and repository: one `images:` entry names both variants.
    (ray_image,) = ray_images
    for where, image in submitter_images.items():
        assert image == ray_image.rsplit("-", 1)[0] + "-cpu", f"{where}: submitter image {image}"


def test_gpu_changes_live_in_one_component():
    # The GPU component, and nothing else, requests GPUs, switches GAN_JOB_USE_GPU on or names the CUDA image.
    gpu_markers = ("nvidia.com/gpu", "GAN_JOB_USE_GPU", "-gpu")
    holders = set()
    for path in sorted(DEPLOY.rglob("*.yaml")):
        lines = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
        if any(marker in line for line in lines for marker in gpu_markers):
            holders.add(path.parent.relative_to(DEPLOY).as_posix())
    assert holders == {"components/gpu"}, f"GPU settings outside components/gpu: {sorted(holders - {'components/gpu'})}"
    kustomizations = {
        overlay: yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())
        for overlay in OVERLAYS
    }
    users = {
        overlay
        for overlay, kustomization in kustomizations.items()
        if "../../components/gpu" in kustomization.get("components", [])
    }
    assert users == {"cluster"}, "overlays/cluster uses it, and overlays/cluster-raycronjob through overlays/cluster"


def test_entrypoints_run_train_with_flags_and_knobs_the_cli_accepts(objects, tmp_path, monkeypatch):
    from job.cli import build_parser

    for name, value in knobs(objects).items():
        monkeypatch.setenv(name, value)
    commands = []
    for driver_command in driver_commands(objects, tmp_path).values():
        commands += job_commands(tmp_path, driver_command, knobs(objects))
    assert commands
    for command in commands:
        assert command[:3] == ["python", "-m", "job"], shlex.join(command)
        args = build_parser().parse_args(command[3:])
        assert args.command in ("train", "tune"), shlex.join(command)


def test_every_entrypoint_trains_its_run_and_promotes_it_to_the_storage_latest(objects, tmp_path):
    # One process: `train --promote-to` (or `tune --promote-to`, its winner), no chain of commands that could
    # promote a failed run.
    from job.cli import build_parser

    storage = knobs(objects)["GAN_JOB_STORAGE"]
    commands = driver_commands(objects, tmp_path)
    assert commands
    for where, driver_command in commands.items():
        (command,) = job_commands(tmp_path, driver_command, knobs(objects))
        train = build_parser().parse_args(command[3:])
        name = train.run_name if train.command == "train" else train.sweep
        assert train.command in ("train", "tune") and name in ("gan-train", "gan-retrain-29000000"), where
        assert train.promote_to == f"{storage}/gan/LATEST", f"{where}: promotes to {train.promote_to}"
        assert train.promote_margin is None, f"{where}: promote's default margin"


def test_the_promotion_target_is_the_heads_storage_and_refused_without_it(objects, tmp_path):
    # The submitter has no knobs (here: a storage of its own, which must not be used): the driver's
    # shell on the head expands the storage, and without the knob it stops before `python` runs.
    for where, driver_command in driver_commands(objects, tmp_path).items():
        assert SUBMITTER_STORAGE not in driver_command and "GAN_JOB_STORAGE" in driver_command, (
            f"{where}: {driver_command}"
        )
        head_without_storage = {k: v for k, v in knobs(objects).items() if k != "GAN_JOB_STORAGE"}
        result = on_the_head(tmp_path, driver_command, head_without_storage)
        assert result.returncode != 0 and result.calls == [] and "GAN_JOB_STORAGE" in result.stderr, (
            f"{where}: {result.stderr}"
        )


def test_every_knob_is_a_train_flag(objects):
    from job.cli import NOT_FROM_ENVIRONMENT, build_parser, env_var_for
    from job.storage.signing import SIGNING_KEY_ENV

    defaults = vars(build_parser().parse_args(["train"]))
    flag_variables = {
        env_var_for(dest) for dest in defaults if dest not in ("command", "handler", *NOT_FROM_ENVIRONMENT)
    } | {SIGNING_KEY_ENV}  # the one variable that is no flag: a secret, never a knob
    for obj in objects:
        for _, container in containers(obj):
            for name in container_env(container, objects):
                if name.startswith("GAN_JOB_"):
                    assert name in flag_variables, f"{name} ({container['name']}) is no train flag's variable"


def test_the_driver_gets_the_knobs_a_cluster_run_needs(objects):
    values = knobs(objects)
    missing = [name for name in REQUIRED_KNOBS if name not in values]
    assert not missing, f"the Ray heads lack {missing}"
    assert urlparse(values["GAN_JOB_STORAGE"]).scheme == "s3", "storage inside a pod is lost with the pod"


def test_knobs_fit_the_worker_group_of_the_rayjob(objects):
    values = knobs(objects)
    for obj in named(objects, "RayJob"):
        (group,) = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        # A sweep's trials train side by side: a worker group each.
        words = shlex.split(obj["spec"]["entrypoint"].split('"')[1]) if " tune " in obj["spec"]["entrypoint"] else []
        at_once = int(words[words.index("--max-concurrent") + 1]) if words else 1
        workers = int(values["GAN_JOB_NUM_WORKERS"]) * at_once
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == workers
        assert float(limits["cpu"]) == float(values["GAN_JOB_CPUS_PER_WORKER"]), (
            "Ray takes a worker's CPUs from its cpu limit"
        )
        uses_gpu = values.get("GAN_JOB_USE_GPU", "false").lower() in ("1", "true", "yes", "on")
        assert uses_gpu == ("nvidia.com/gpu" in limits)


def test_s3_settings_reach_every_ray_pod_from_a_secret(objects):
    for role, container in ray_containers(objects):
        env = container_env(container, objects)
        for name in S3_VARIABLES:
            assert name in env and env[name][0] == "secret", f"{role} {container['name']}: {name} from {env.get(name)}"


def test_no_credential_is_written_outside_a_secret(objects):
    for obj in objects:
        for _, container in containers(obj):
            for var in container.get("env", []):
                if "value" in var:
                    assert var["name"] not in S3_VARIABLES, (
                        f"{obj['kind']} {obj['metadata']['name']}: literal {var['name']}"
                    )
                    assert not CREDENTIAL_NAME.search(var["name"]), (
                        f"{obj['kind']} {obj['metadata']['name']}: literal {var['name']}"
                    )


def test_referenced_secrets_and_configmaps_exist(objects):
    # KubeRay generates a token Secret, named after the cluster, for a RayCluster with token auth.
    clusters = named(objects, "RayCluster")
    generated = {
        obj["metadata"]["name"] for obj in clusters if obj["spec"].get("authOptions", {}).get("mode") == "token"
    }
    for obj in objects:
        for _, container in containers(obj):
            for kind, name, key in referenced(container):
                if kind == "Secret" and name in generated:
                    assert key in (None, "auth_token"), f"KubeRay's token Secret {name} has only auth_token"
                    continue
                data = object_data(objects, kind, name)
                assert data is not None, (
                    f"{obj['kind']} {obj['metadata']['name']}: {kind} {name} is neither built nor an example"
                )
                assert key is None or key in data, f"{kind} {name} has no key {key}"


def referenced(container: dict) -> Iterator[tuple[str, str, str | None]]:
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            yield "ConfigMap", source["configMapRef"]["name"], None
        if "secretRef" in source:
            yield "Secret", source["secretRef"]["name"], None
    for var in container.get("env", []):
        for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if ref in var.get("valueFrom", {}):
                yield kind, var["valueFrom"][ref]["name"], var["valueFrom"][ref]["key"]


def test_secret_examples_hold_placeholders_and_are_not_applied():
    assert examples(), "an example of the S3 Secret for clusters with their own S3"
    for example in examples():
        data = {**example.get("data", {}), **example.get("stringData", {})}
        secrets = [key for key in data if "KEY" in key.upper() or "SECRET" in key.upper()]
        assert secrets, f"{example['metadata']['name']}: holds no key"
        for key in secrets:
            assert data[key] == "CHANGE_ME", f"{example['metadata']['name']}: {key} must be a placeholder"
    for path in DEPLOY.rglob("kustomization.yaml"):
        listed = yaml.safe_load(path.read_text()).get("resources", [])
        assert not [name for name in listed if name.endswith(".example.yaml")], (
            f"{path.relative_to(REPO)} applies an example"
        )


# Tests: run names, retries and schedules.


def test_a_rayjob_runs_under_its_own_name_so_a_retry_resumes(objects, tmp_path):
    for obj in objects:
        for spec in rayjob_specs(obj):
            assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", (
                "the run name comes from the submitter's shell"
            )
            assert spec["backoffLimit"] >= 1, "a failed run is retried"
            submitter = spec["submitterPodTemplate"]["spec"]["containers"][0]
            assert container_env(submitter, objects)["RAYJOB_NAME"] == (
                "field",
                "metadata.labels['batch.kubernetes.io/job-name']",
            )
            # A retry is a new cluster and a new submission id, but the same RayJob (and Job) name.
            for name in ("gan-train", "gan-retrain-k2x9q"):
                commands = job_commands(tmp_path, kuberay_submit(tmp_path, spec["entrypoint"], name), knobs(objects))
                assert [run_name_of(command) for command in commands if command[3] in ("train", "tune")] == [name]


def test_each_raycronjob_firing_trains_under_its_own_run_name(objects, tmp_path):
    for cron in named(objects, "RayCronJob"):
        spec = cron["spec"]["jobTemplate"]
        assert not spec.get("jobId"), "a fixed submission id would be the same for every firing"
        # KubeRay names each firing's RayJob <RayCronJob>-<5 random characters>.
        name = cron["metadata"]["name"]
        first, second = (
            kuberay_submit(tmp_path, spec["entrypoint"], f"{name}-{suffix}") for suffix in ("a1b2c", "d3e4f")
        )
        first_run, second_run = (
            run_name_of(job_commands(tmp_path, driver, knobs(objects))[0]) for driver in (first, second)
        )
        assert first_run != second_run


@pytest.mark.parametrize(
    ("earlier_attempts", "expected_submission", "expected_stops"),
    [((), "-0", []), (("-0",), "-1", ["-0"]), (("-0", "-1"), "-2", ["-0", "-1"])],
    ids=["first-attempt", "second-attempt", "third-attempt"],
)
def test_a_cronjob_firing_resumes_its_run_on_retry(
    objects, tmp_path, earlier_attempts, expected_submission, expected_stops
):
    for cronjob in named(objects, "CronJob"):
        firing = f"{cronjob['metadata']['name']}-29000000"
        calls = run_with_fake_ray(
            tmp_path, cronjob_script(cronjob), {"FIRING": firing}, tuple(firing + a for a in earlier_attempts)
        )
        submission_id, driver_command = submitted(calls)
        assert submission_id == firing + expected_submission, "each attempt under a new submission id"
        trains = [
            command for command in job_commands(tmp_path, driver_command, knobs(objects)) if command[3] == "train"
        ]
        assert [run_name_of(command) for command in trains] == [firing], "every attempt, the same run"
        stops = [call[-1] for call in calls if call[:2] == ["job", "stop"]]
        assert stops == [firing + a for a in expected_stops], "an earlier attempt's driver is stopped first"


def test_cronjob_fires_once_at_a_time_and_names_runs_after_its_job(objects):
    for cronjob in named(objects, "CronJob"):
        spec = cronjob["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never", "a retry must be a new pod of the same Job"
        env = container_env(pod["containers"][0], objects)
        assert env["FIRING"] == ("field", "metadata.labels['batch.kubernetes.io/job-name']")


def test_each_overlay_schedules_retraining_once(objects):
    schedulers = named(objects, "CronJob") + named(objects, "RayCronJob")
    assert len(schedulers) == 1, [obj["kind"] for obj in schedulers]


def test_a_raycronjob_fires_the_overlays_rayjob(objects):
    for cron in named(objects, "RayCronJob"):
        assert cron["spec"]["jobTemplate"] == named(objects, "RayJob", "gan-train")[0]["spec"]


def test_rayjobs_clean_up_and_stop_on_time(objects):
    for obj in objects:
        for spec in rayjob_specs(obj):
            assert spec["shutdownAfterJobFinishes"] is True
            assert spec["ttlSecondsAfterFinished"] > 0
            assert spec["activeDeadlineSeconds"] > 0


# Tests: security.


def secret_variables(container: dict, objs: list[dict]) -> set[str]:
    """The environment variables of a container whose values come from a Secret."""
    env = container_env(container, objs)
    return {name for name, source in env.items() if source[0] == "secret"} | set(KUBERAY_SECRET_VARIABLES)


def expands(text: str, name: str) -> bool:
    """Whether a shell expands the variable in the text ($NAME, ${NAME...}), or Kubernetes does ($(NAME))."""
    return re.search(rf"\$(?:{name}|\{{{name}|\({name}\))(?!\w)", text) is not None


def secrets_on_command_lines(container: dict, secrets: set[str]) -> list[str]:
    """The lines of a container's command and args that put a secret on some program's command line.

    A secret may only be assigned to a shell variable (an assignment starts no process, and an
    exported variable reaches a program through its environment, which only its own user can
    read); a variable assigned from a secret counts as one. Kubernetes itself expands $(NAME) in
    command and args, so that form is a leak wherever it stands: the value lands in the shell's argv."""
    words = [*container.get("command", []), *container.get("args", [])]
    leaks = [word for word in words for name in secrets if re.search(rf"\$\({name}\)", word)]
    lines = [line.strip() for word in words for line in word.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    tainted = set(secrets)
    while True:
        assigned = {
            line.removeprefix("export").strip().split("=", 1)[0]
            for line in lines
            if SHELL_ASSIGNMENT.fullmatch(line) and any(expands(line, name) for name in tainted)
        }
        if assigned <= tainted:
            break
        tainted |= assigned
    return leaks + [
        line for line in lines if not SHELL_ASSIGNMENT.fullmatch(line) and any(expands(line, name) for name in tainted)
    ]


class Pod(NamedTuple):
    """A pod an overlay makes: where it comes from, the labels it will carry, the Ray cluster it
    belongs to (Ray pods) or submits to (submitters), and its containers' port names."""

    where: str
    labels: dict[str, str]
    role: str  # "ray", "submitter" or "other"
    cluster: str | None
    ports: frozenset[str]


def kuberay_pod_labels(template: dict, cluster: str, node_type: str, group: str) -> dict[str, str]:
    """A Ray pod's labels as KubeRay 1.6 sets them (common/pod.go labelPod): its own, then the
    template's, which override all but ray.io/cluster, ray.io/node-type and ray.io/group."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
        **template.get("metadata", {}).get("labels", {}),
    }
    return {**labels, "ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group}


def port_names(template: dict) -> frozenset[str]:
    return frozenset(port.get("name", "") for c in template["spec"]["containers"] for port in c.get("ports", []))


def overlay_pods(objs: list[dict]) -> list[Pod]:
    """Every pod an overlay makes, with the labels of its template and those its controller adds."""
    found = []
    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        # The clusters of one RayJob spec share their labels: a RayCronJob fires copies of gan-train's.
        clusters = [(f"RayCluster {name}", name, obj["spec"])] if kind == "RayCluster" else []
        for spec in rayjob_specs(obj):
            # KubeRay names a RayJob's cluster <rayjob>-<random>; a RayCronJob its RayJobs <cron>-<random>.
            rayjob = f"{name}-a1b2c" if kind == "RayCronJob" else name
            key = "RayJob spec " + json.dumps(spec, sort_keys=True)
            clusters.append((key, f"{rayjob}-x7k2p", spec["rayClusterSpec"]))
            template = spec["submitterPodTemplate"]
            labels = {**template.get("metadata", {}).get("labels", {}), "batch.kubernetes.io/job-name": rayjob}
            found.append(Pod(f"{kind} {name} submitter", labels, "submitter", key, port_names(template)))
        for key, cluster_name, cluster in clusters:
            head = cluster["headGroupSpec"]["template"]
            labels = kuberay_pod_labels(head, cluster_name, "head", "headgroup")
            found.append(Pod(f"{kind} {name} head", labels, "ray", key, port_names(head)))
            for group in cluster.get("workerGroupSpecs", []):
                labels = kuberay_pod_labels(group["template"], cluster_name, "worker", group["groupName"])
                found.append(
                    Pod(f"{kind} {name} {group['groupName']}", labels, "ray", key, port_names(group["template"]))
                )
        if kind == "CronJob":
            template = obj["spec"]["jobTemplate"]["spec"]["template"]
            labels = {**template.get("metadata", {}).get("labels", {}), "batch.kubernetes.io/job-name": f"{name}-1"}
            address = container_env(template["spec"]["containers"][0], objs).get("RAY_API_SERVER_ADDRESS")
            host = urlparse(address[1]).hostname if address else None
            cluster = f"RayCluster {host.removesuffix('-head-svc')}" if host else None
            found.append(
                Pod(f"{kind} {name}", labels, "submitter" if cluster else "other", cluster, port_names(template))
            )
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            template = obj["spec"]["template"]
            found.append(
                Pod(f"{kind} {name}", template.get("metadata", {}).get("labels", {}), "other", None, frozenset())
            )
    return found


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches these labels (an empty one matches every pod)."""
    if not all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items()):
        return False
    tests = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return all(tests[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", []))


def test_every_container_has_requests_and_limits(objects):
    for obj in objects:
        for _, container in containers(obj):
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                where = f"{obj['kind']} {obj['metadata']['name']} {container['name']}"
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part}"
        for cluster in raycluster_specs(obj):
            if cluster.get("enableInTreeAutoscaling"):
                resources = cluster["autoscalerOptions"]["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), (
                    "the autoscaler container"
                )


def locked_down(pod: dict, security: dict) -> list[str]:
    problems = []
    if not (security.get("runAsNonRoot") or pod.get("securityContext", {}).get("runAsNonRoot")):
        problems.append("runAsNonRoot")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation: false")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities drop ALL")
    if security.get("privileged"):
        problems.append("not privileged")
    return problems


def test_every_container_runs_locked_down(objects):
    for obj in objects:
        for pod, container in containers(obj):
            problems = locked_down(pod, container.get("securityContext", {}))
            assert not problems, f"{obj['kind']} {obj['metadata']['name']} {container['name']} needs {problems}"
            assert pod.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for cluster in raycluster_specs(obj):
            if cluster.get("enableInTreeAutoscaling"):
                assert not locked_down({}, cluster["autoscalerOptions"]["securityContext"]), "the autoscaler container"


def test_every_rayjob_brings_its_own_locked_down_submitter(objects):
    # Without a submitterPodTemplate KubeRay's default submitter container has no securityContext.
    for obj in objects:
        for spec in rayjob_specs(obj):
            assert "submitterPodTemplate" in spec, f"{obj['kind']} {obj['metadata']['name']}"


def test_ray_dashboards_stay_inside_the_cluster(objects):
    for obj in objects:
        for cluster in raycluster_specs(obj):
            assert cluster["headGroupSpec"].get("serviceType") == "ClusterIP"
            assert not cluster["headGroupSpec"].get("enableIngress")
        assert obj["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute")
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]


def test_ray_clusters_require_a_token_and_the_cronjob_has_it(objects):
    for obj in objects:
        for cluster in raycluster_specs(obj):
            assert cluster.get("authOptions", {}).get("mode") == "token", f"{obj['kind']} {obj['metadata']['name']}"
    standing = {obj["metadata"]["name"] for obj in named(objects, "RayCluster")}
    for cronjob in named(objects, "CronJob"):
        env = container_env(cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0], objects)
        host = urlparse(env["RAY_API_SERVER_ADDRESS"][1]).hostname
        assert host.endswith("-head-svc") and host.removesuffix("-head-svc") in standing, host
        assert env["RAY_AUTH_MODE"] == ("value", "token")
        # KubeRay keeps a cluster's generated token in a Secret named after the cluster.
        assert env["RAY_AUTH_TOKEN"] == ("secret", host.removesuffix("-head-svc"), "auth_token")


def test_the_job_namespace_enforces_the_restricted_pod_security_standard(objects):
    (namespace,) = named(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def admits(rules: list[dict], pod: Pod, other: Pod, port: str | None) -> bool:
    """Whether ingress rules of a pod admit another pod of its namespace: to every port, or to the
    named port (which the pod must have)."""
    for rule in rules:
        if not any(
            "namespaceSelector" not in peer and selects(peer["podSelector"], other.labels) for peer in rule["from"]
        ):
            continue
        if not rule.get("ports") or (port in pod.ports and {"port": port} in rule["ports"]):
            return True
    return False


def test_no_secret_reaches_a_command_line(objects):
    # /proc/<pid>/cmdline is readable by whoever can see the process; its environment is not.
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        secrets: set[str] = set()
        for _, container in containers(obj):
            secrets |= secret_variables(container, objects)
            leaks = secrets_on_command_lines(container, secret_variables(container, objects))
            assert not leaks, f"{where} {container['name']}: a secret on a command line: {leaks}"
        # The entrypoint becomes the argv of `ray job submit` and of the driver's shell, and KubeRay
        # builds the `ray start` command lines from rayStartParams.
        words = [spec["entrypoint"] for spec in rayjob_specs(obj)]
        for cluster in raycluster_specs(obj):
            for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
                words += [str(value) for value in group.get("rayStartParams", {}).values()]
        assert not [word for word in words for name in secrets if expands(word, name)], where


@pytest.mark.parametrize(
    "script",
    [
        'mc alias set local "$AWS_ENDPOINT_URL" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"',
        'key="${AWS_SECRET_ACCESS_KEY}"\ncurl --user "me:$key" https://example.com',
        'export X=$(printf %s "$AWS_SECRET_ACCESS_KEY")',
        'export MC_HOST_local="http://me:$(AWS_SECRET_ACCESS_KEY)@minio:9000"',
    ],
    ids=["argument", "through-a-variable", "command-substitution", "kubernetes-expansion"],
)
def test_the_command_line_check_finds_a_secret_passed_to_a_program(script):
    container = {"command": ["/bin/sh", "-c"], "args": [script]}
    assert secrets_on_command_lines(container, {"AWS_SECRET_ACCESS_KEY"})


def test_every_ray_pod_admits_only_its_own_cluster_and_its_submitters(objects):
    everyone = overlay_pods(objects)
    policies = [
        policy
        for policy in named(objects, "NetworkPolicy")
        if "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
    ]
    ray_pods = [pod for pod in everyone if pod.role == "ray"]
    assert ray_pods
    for pod in ray_pods:
        selecting = [policy for policy in policies if selects(policy["spec"]["podSelector"], pod.labels)]
        assert selecting, f"{pod.where}: no ingress NetworkPolicy selects it"
        rules = [rule for policy in selecting for rule in policy["spec"].get("ingress", [])]
        for rule in rules:
            assert rule.get("from"), f"{pod.where}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, f"{pod.where}: {peer}"
                if "namespaceSelector" in peer:
                    # KubeRay's operator, in its own namespace, reads a RayJob's status from the job API.
                    assert set(peer["namespaceSelector"].get("matchLabels", {})) == {"kubernetes.io/metadata.name"}
                    assert peer.get("podSelector", {}).get("matchLabels") == KUBERAY_OPERATOR, peer
                    assert rule.get("ports") == [{"port": "dashboard"}], "the operator only reads the job API"
                    continue
                selector = peer["podSelector"]
                assert selector.get("matchLabels") or selector.get("matchExpressions"), (
                    f"{pod.where}: an empty podSelector admits every pod of the namespace"
                )
                strangers = [
                    other.where
                    for other in everyone
                    if selects(selector, other.labels) and other.cluster != pod.cluster
                ]
                assert not strangers, f"{pod.where} admits pods of no concern to its cluster: {strangers}"

        # ... and the cluster still works: its own pods on every port, its submitters on the head's job API.
        for other in everyone:
            if other.cluster == pod.cluster and other.role == "ray":
                assert admits(rules, pod, other, None), f"{pod.where} must admit {other.where} on every port"
            if other.cluster == pod.cluster and other.role == "submitter" and pod.labels["ray.io/node-type"] == "head":
                assert admits(rules, pod, other, "dashboard"), f"{pod.where} must admit {other.where} to the job API"


def test_checkov_accepts_the_manifests_and_the_dockerfile(tmp_path):
    scan = tmp_path / "scan"
    scan.mkdir()
    for overlay in OVERLAYS:
        (scan / f"{overlay}.yaml").write_text(yaml.safe_dump_all(built_overlay(overlay)))
    for path in DEPLOY.rglob("*.example.yaml"):
        shutil.copy(path, scan / path.name)
    shutil.copy(REPO / "Dockerfile", scan / "Dockerfile")
    # checkov pins old boto3, packaging and networkx, so it lives in an environment of its own.
    checkov = tool("checkov")
    result = subprocess.run(
        [
            checkov,
            "--directory",
            str(scan),
            "--framework",
            "kubernetes",
            "dockerfile",
            "secrets",
            "--output",
            "json",
            "--skip-download",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode in (0, 1), f"checkov failed to run:\n{result.stderr[-2000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    scanned = {report["check_type"]: report["summary"] for report in reports}
    assert scanned["kubernetes"]["resource_count"] > 0 and scanned["dockerfile"]["resource_count"] > 0, scanned
    assert all(summary["parsing_errors"] == 0 for summary in scanned.values()), scanned
    failed = [
        (check["check_id"], check["resource"], check["file_path"])
        for report in reports
        for check in report.get("results", {}).get("failed_checks", [])
    ]

    def matches(key: tuple[str, str], check_id: str, resource: str) -> bool:
        return check_id == key[0] and fnmatch.fnmatch(resource, key[1])

    assert [finding for finding in failed if not any(matches(key, *finding[:2]) for key in CHECKOV_ACCEPTED)] == []
    unused = [key for key in CHECKOV_ACCEPTED if not any(matches(key, *finding[:2]) for finding in failed)]
    assert unused == [], "accepted findings that no longer occur: remove them"


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(REPO / "Dockerfile")], check=False, capture_output=True, text=True
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_image_is_built_from_the_package_alone():
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignored[0] == "*", ".dockerignore lets in only what it names"
    assert sorted(line for line in ignored if line.startswith("!")) == [
        "!README.md",
        "!deploy/image/requirements-gpu.txt",
        "!deploy/image/requirements.txt",
        "!gan/",
        "!job/",
        "!pyproject.toml",
    ]
    dockerfile = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root") and users[-1].split(":")[0].isdigit(), (
        "a numeric non-root user"
    )
    assert "[dev]" not in dockerfile and not re.search(
        r"^(ENV|ARG) \w*(SECRET|PASSWORD|TOKEN|KEY)\w*", dockerfile, re.MULTILINE
    )


def pinned(path: Path) -> dict[str, str]:
    """name -> version of a requirements file in which every requirement is pinned and hashed."""
    pins = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][\w.-]*)(\[[\w,.-]+\])?==(\S+)", words[0])
        assert match, f"{path.name}: {words[0]} is not pinned with =="
        assert words[1:] and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", word) for word in words[1:]), (
            f"{path.name}: {words[0]} has no sha256"
        )
        pins[canonicalize_name(match.group(1))] = match.group(3)
    return pins


def test_the_base_image_is_pinned_by_digest():
    dockerfile = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    _, _, digest = base.partition("@")
    argument = re.fullmatch(r"\$\{(\w+)\}", digest)
    if argument:
        # Not known here: a build argument without a default, so that no build goes on without it.
        assert re.search(rf"^ARG {argument.group(1)}$", dockerfile, re.MULTILINE), f"ARG {argument.group(1)}"
    else:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"FROM {base}: the tag and its digest"


def test_the_image_installs_hash_pinned_wheels_each_from_one_index():
    dockerfile = (REPO / "Dockerfile").read_text()
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    # Two indexes for one install let a package of the same name on either win.
    assert not re.search(r"extra[-_]index[-_]url|find[-_]links|trusted[-_]host", code, re.IGNORECASE)
    run = code.replace("\\\n", " ")
    installs = [shlex.split(part) for part in re.split(r"&&|;|\bthen\b|\belse\b", run) if "pip install" in part]
    assert len(installs) >= 3
    for words in installs:
        assert "--isolated" in words, f"{shlex.join(words)}: settings from the base image could add an index"
        if "--no-index" in words:
            assert "--no-deps" in words and "--no-build-isolation" in words, "this package, built offline"
            continue
        assert {"--require-hashes", "--only-binary=:all:"} <= set(words) and words.count("--index-url") == 1, (
            shlex.join(words)
        )
    common, gpu = (pinned(path) for path in REQUIREMENTS)
    assert not common.keys() & gpu.keys()
    # The cpu variant takes torch and torchvision from PyTorch's CPU index, checked against build arguments
    # that have no default; the gpu variant takes PyPI's, at the same versions.
    args = dockerfile_args()
    assert {"torch", "torchvision"}.isdisjoint(common)
    assert (gpu["torch"], gpu["torchvision"]) == (args["TORCH_VERSION"], args["TORCHVISION_VERSION"])
    for name in ("TORCH_CPU_SHA256", "TORCHVISION_CPU_SHA256"):
        assert re.search(rf"^ARG {name}$", dockerfile, re.MULTILINE) and f"${{{name}:?" in dockerfile, name


def test_the_image_pins_every_dependency_of_the_package_but_ray():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pins = {name: version for path in REQUIREMENTS for name, version in pinned(path).items()}
    for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        version = pins.get(canonicalize_name(requirement.name))
        if canonicalize_name(requirement.name) == "ray":
            assert version is None, "Ray comes with the base image"
            continue
        assert version and requirement.specifier.contains(version, prereleases=True), f"{line}: pinned {version}"


def test_s3_env_files_stay_out_of_git_and_of_ray_job_submit_working_dir(tmp_path, monkeypatch):
    # deploy/README.md creates the S3 Secret from a file of credentials and ships the checkout with
    # `ray job submit --working-dir .`, which packs it as Ray's job SDK does here: honouring the
    # .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1.
    from ray._private.runtime_env.packaging import create_package
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    docs = [DEPLOY / "README.md", *DEPLOY.rglob("*.yaml")]
    env_files = {name for path in docs for name in re.findall(r"--from-env-file=(\S+)", path.read_text())}
    assert env_files, "the docs name the file the S3 Secret is created from"
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *env_files], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert set(ignored.stdout.split()) == env_files, "git would commit them"
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "job").mkdir(parents=True)
    (checkout / "job" / "cli.py").write_text("")
    shutil.copy(REPO / ".gitignore", checkout)
    for name in env_files:
        (checkout / name).write_text("AWS_SECRET_ACCESS_KEY=not-a-real-one\n")
    packages = []

    def package(path, include_gitignore, include_parent_dir=False, excludes=None, is_file=False):
        packages.append(tmp_path / "package.zip")
        create_package(path, packages[-1], include_gitignore, include_parent_dir=include_parent_dir, excludes=excludes)

    SubmissionClient._upload_working_dir_if_needed(
        SimpleNamespace(_upload_package_if_needed=package), {"working_dir": str(checkout)}
    )
    (archive,) = packages
    uploaded = set(zipfile.ZipFile(archive).namelist())
    assert "job/cli.py" in uploaded and not env_files & uploaded, sorted(uploaded)


def test_shell_scripts_pass_shellcheck(tmp_path):
    scripts = [DEPLOY / "run-local.sh"]
    for overlay in OVERLAYS:
        for cronjob in named(list(built_overlay(overlay)), "CronJob"):
            scripts.append(tmp_path / f"{overlay}-cronjob.sh")
            scripts[-1].write_text("#!/usr/bin/env bash\n" + cronjob_script(cronjob))
    result = subprocess.run([tool("shellcheck"), *map(str, scripts)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Tests: what sets the overlays apart.


def gpu_limits(objects: list[dict]) -> list[tuple[str, str | None, str | None]]:
    return [
        (
            role,
            container["resources"]["requests"].get("nvidia.com/gpu"),
            container["resources"]["limits"].get("nvidia.com/gpu"),
        )
        for role, container in ray_containers(objects)
    ]


def test_the_local_overlay_is_a_short_cpu_run_against_minio():
    objects = list(built_overlay("local"))
    assert all(requests is None and limits is None for _, requests, limits in gpu_limits(objects))
    values = knobs(objects)
    assert int(values["GAN_JOB_EPOCHS"]) <= 5 and "GAN_JOB_LIMIT" in values, "a short run"
    (secret,) = named(objects, "Secret", "gan-job-s3")
    endpoint = urlparse(secret["stringData"]["AWS_ENDPOINT_URL"])
    (service,) = named(objects, "Service", endpoint.hostname)
    assert endpoint.port in [port["port"] for port in service["spec"]["ports"]]
    assert named(objects, "Deployment", endpoint.hostname) and named(objects, "PersistentVolumeClaim")
    (bucket_job,) = named(objects, "Job")
    bucket = container_env(bucket_job["spec"]["template"]["spec"]["containers"][0], objects)["BUCKET"][1]
    assert urlparse(values["GAN_JOB_STORAGE"]).netloc == bucket, "the Job creates the bucket the runs go to"


@pytest.mark.parametrize("overlay", [name for name in OVERLAYS if name.startswith("cluster")])
def test_cluster_overlays_run_full_epochs_on_gpu_workers_against_external_s3(overlay):
    objects = list(built_overlay(overlay))
    for role, requests, limits in gpu_limits(objects):
        if role == "worker":
            assert requests == limits and int(limits) >= 1, "GPUs requested and limited alike"
    values = knobs(objects)
    assert values["GAN_JOB_USE_GPU"] == "true" and "GAN_JOB_EPOCHS" not in values and "GAN_JOB_LIMIT" not in values
    assert not named(objects, "Secret") and not named(objects, "Deployment"), (
        "S3 is external; its Secret is the operator's"
    )
