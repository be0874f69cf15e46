"""Every kustomization under k8s/ renders, and every object it renders is valid for a cluster.

There is no cluster here, so validity means: RayJobs match the KubeRay v1.7.0 CRD schema with
unknown fields refused (an API server would silently prune a misspelled field, and the job would
run without it), built-in kinds match Kubernetes' own schemas (kubernetes-validate, strict), and
each RayJob's entrypoint names a job file that exists and whose config loads.
"""

import copy
import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator

import presso
from presso.orchestrator.config import load_config

from .kustomize_lite import render as render_lite

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# The CRDs live beside the repository (../shared), not in it: they are KubeRay's files.
CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUBERNETES = "1.32"  # the oldest minor version the manifests promise to work on
FOLDERS = ["common", "base", "overlays/cpu-small", "overlays/gpu", "mlflow", "schedule"]

# Embedded ObjectMeta: the CRD says only `type: object` (the API server checks it itself).
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.cache
def render(folder: str) -> tuple[dict, ...]:
    """kustomize's output where a binary exists, else kustomize_lite's."""
    command = _kustomize()
    if command is None:
        return tuple(render_lite(K8S / folder))
    out = subprocess.run(
        [*command, str(K8S / folder)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def strict(node):
    """The CRD schema with every object closed, as the API server's pruning closes it.

    An object without ``additionalProperties`` keeps only its listed ``properties``; the API
    server drops the rest silently, so here the rest is an error. Objects marked
    ``x-kubernetes-preserve-unknown-fields`` stay open (KubeRay v1.7.0 has none).
    """
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if (
        out.get("type") == "object"
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> Draft202012Validator:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS} (the shared folder beside the repository)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB of YAML
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return Draft202012Validator(strict(schema))


def embedded(obj: dict) -> list[dict]:
    """RayJob templates a ConfigMap carries (the nightly schedule's)."""
    if obj["kind"] != "ConfigMap":
        return []
    docs = [yaml.safe_load(v) for k, v in obj.get("data", {}).items() if k.endswith(".yaml")]
    return [d for d in docs if isinstance(d, dict) and d.get("apiVersion", "").startswith("ray.")]


def problems(obj: dict) -> list[str]:
    """Why an API server would reject (or silently change) ``obj``; empty if it is valid."""
    meta = obj.get("metadata", {})
    name = f"{obj.get('kind')}/{meta.get('name') or meta.get('generateName')}"
    if obj.get("kind") in CRD_FILES:
        errors = crd_validator(obj["kind"]).iter_errors(obj)
        found = [f"{name} {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    else:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
            found = []
        except kubernetes_validate.ValidationError as e:
            found = [f"{name} {'.'.join(map(str, e.path))}: {e.message}"]
    return found + [p for inner in embedded(obj) for p in problems(inner)]


def rayjobs(folder: str) -> list[dict]:
    objects = render(folder)
    return [o for o in objects if o["kind"] == "RayJob"] + [e for o in objects for e in embedded(o)]


def containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_rendered_object_is_valid(folder):
    """What `kubectl apply -k` would send must pass the API server's schema checks as written."""
    objects = render(folder)
    assert objects
    assert [p for o in objects for p in problems(o)] == []


MUTATIONS = [
    # (folder, text in the rendered YAML, its misspelling)
    ("overlays/cpu-small", "shutdownAfterJobFinishes:", "shutdownAfterJobFinish:"),
    ("overlays/cpu-small", "rayStartParams:", "rayStartParameters:"),
    ("overlays/cpu-small", "minReplicas: 1", "minReplicas: one"),
    ("overlays/gpu", "tolerations:", "toleration:"),
    ("overlays/gpu", "containerPort:", "containerport:"),
    ("mlflow", "readinessProbe:", "readynessProbe:"),
    ("mlflow", "targetPort:", "targetport:"),
    ("common", "accessModes:", "accessMode:"),
    ("schedule", "concurrencyPolicy:", "concurrencyPolicies:"),
    ("schedule", "ttlSecondsAfterFinished:", "ttlSecondAfterFinished:"),  # in the template
    ("schedule", "generateName:", "generatedName:"),
]


@pytest.mark.parametrize(("folder", "field", "typo"), MUTATIONS)
def test_a_misspelled_field_fails(folder, field, typo):
    """The validation above must be able to fail: a single misspelling anywhere is caught."""
    text = yaml.safe_dump_all(render(folder), width=1000)
    assert field in text
    mutated = [d for d in yaml.safe_load_all(text.replace(field, typo, 1)) if d]
    found = [p for o in mutated for p in problems(o)]
    assert any(typo.split(":")[0] in p for p in found), found  # caught, and for this reason


@pytest.mark.parametrize("folder", FOLDERS)
def test_lite_renderer_matches_kustomize(folder):
    """The fallback renderer (used where no kustomize exists) renders what kustomize does."""
    if _kustomize() is None:
        pytest.skip("neither kustomize nor kubectl is installed")

    def key(o):
        return (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])

    assert {key(o): o for o in render_lite(K8S / folder)} == {key(o): o for o in render(folder)}


def test_entrypoints_run_existing_valid_jobs():
    """A RayJob naming a missing or invalid job file fails only after its cluster started."""
    for folder in FOLDERS:
        for job in rayjobs(folder):
            argv = shlex.split(job["spec"]["entrypoint"])
            assert argv[:2] == ["presso", "run"], job["spec"]["entrypoint"]
            path = REPO / argv[2]
            assert path.parent == REPO / "jobs" and path.is_file(), argv[2]
            load_config(path, argv[3:])


def test_images_and_gpus_match_the_overlay():
    """The gpu overlay asks for GPUs, uses them, and runs the CUDA image; cpu-small does not."""
    tag = re.compile(rf"^ghcr\.io/presso/presso:{re.escape(presso.__version__)}-(cpu|cu\d+)$")
    gpu, cpu = rayjobs("overlays/gpu")[0], rayjobs("overlays/cpu-small")[0]
    for job, kind in ((gpu, "cu"), (cpu, "cpu")):
        images = {c["image"] for c in containers(job)}
        assert all(tag.match(i) and tag.match(i)[1].startswith(kind) for i in images), images
    workers = gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all(
        g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for g in workers
    )
    assert "train.use_gpu=true" in shlex.split(gpu["spec"]["entrypoint"])
    assert not any("nvidia.com/gpu" in str(c["resources"]) for c in containers(cpu))


def test_jobs_track_to_the_mlflow_service():
    """The tracking URI every job gets reaches the MLflow Service, which accepts that Host."""
    (config,) = [o for o in render("common") if o["kind"] == "ConfigMap"]
    uri = config["data"]["MLFLOW_TRACKING_URI"]
    host = uri.removeprefix("http://")
    service = next(o for o in render("mlflow") if o["kind"] == "Service")
    name, namespace, port = re.fullmatch(r"([\w-]+)\.([\w-]+)\.svc:(\d+)", host).groups()
    assert (name, namespace) == (service["metadata"]["name"], service["metadata"]["namespace"])
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    deployment = next(o for o in render("mlflow") if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}  # fmt: skip
    assert host in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for folder in FOLDERS:
        for job in rayjobs(folder):
            for c in containers(job):
                assert {"configMapRef": {"name": config["metadata"]["name"]}} in c["envFrom"]


def test_nightly_template_runs_the_cpu_small_cluster():
    """The schedule's RayJob is a copy of cpu-small's cluster; this keeps the copy honest."""
    (nightly,) = rayjobs("schedule")
    (small,) = rayjobs("overlays/cpu-small")
    assert nightly["spec"]["rayClusterSpec"] == small["spec"]["rayClusterSpec"]
    assert nightly["metadata"]["generateName"]  # a fresh name every night


def test_dockerfile_pins_the_makefiles_torch():
    """The image's torch is the one the test suite runs with (a newer one pulls CUDA builds)."""
    makefile = re.search(r"^TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    dockerfile = re.search(r"^ARG TORCH=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)[1]
    assert dockerfile == makefile
