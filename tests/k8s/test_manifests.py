"""Every kustomization under k8s/ renders, and every object it renders is valid for a cluster.

There is no cluster here, so validity means: RayJobs match the KubeRay v1.7.0 CRD schema with
unknown fields refused (an API server would silently prune a misspelled field, and the job would
run without it), built-in kinds match Kubernetes' own schemas (kubernetes-validate, strict),
every pod they make passes Pod Security "restricted" (``pod_security.py``), and each RayJob's
entrypoint names a job file that exists and whose config loads.
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
from .pod_security import pod_specs, restricted_violations

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# The CRDs live beside the repository (../shared), not in it: they are KubeRay's files.
CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUBERNETES = "1.32"  # the oldest minor version the manifests promise to work on
FOLDERS = [
    "common",
    "base",
    "overlays/cpu-small",
    "overlays/gpu",
    "overlays/production",
    "mlflow",
    "schedule",
]

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
    return found


def rayjobs(folder: str) -> list[dict]:
    return [o for o in render(folder) if o["kind"] == "RayJob"]


def ray_containers(rayjob: dict) -> list[dict]:
    """The Ray head's and workers' containers (not the submitter's)."""
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def all_containers(folder: str) -> list[tuple[str, dict]]:
    """Every container of every pod the folder's objects make."""
    return [
        (f"{where} {c['name']}", c)
        for obj in render(folder)
        for where, spec in pod_specs(obj)
        for c in spec.get("initContainers", []) + spec["containers"]
    ]


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
    ("schedule", "suspend:", "suspended:"),
    ("overlays/production", "storageClassName:", "storageClass:"),
    ("mlflow", "policyTypes:", "policyType:"),
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
    for folder, kind in (("overlays/gpu", "cu"), ("overlays/cpu-small", "cpu")):
        images = {c["image"] for _, c in all_containers(folder)}
        assert all(tag.match(i) and tag.match(i)[1].startswith(kind) for i in images), images
    gpu, cpu = rayjobs("overlays/gpu")[0], rayjobs("overlays/cpu-small")[0]
    for group in gpu["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        # only on GPU nodes, which are tainted to keep other pods away
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
    head = gpu["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "nodeSelector" not in head and "tolerations" not in head  # the driver needs no GPU
    assert "train.use_gpu=true" in shlex.split(gpu["spec"]["entrypoint"])
    assert not any("nvidia.com/gpu" in str(c["resources"]) for c in ray_containers(cpu))


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
            for c in ray_containers(job):
                assert {"configMapRef": {"name": config["metadata"]["name"]}} in c["envFrom"]
                # the server wants credentials: a job without them must not start at all
                assert {"secretRef": {"name": "presso-mlflow-auth"}} in c["envFrom"]


def test_nightly_template_is_the_cpu_small_job_suspended():
    """The schedule's template is cpu-small's RayJob, suspended (KubeRay creates nothing for it)
    and telling every night to log to one experiment and one registered model."""
    (nightly,) = rayjobs("schedule")
    (small,) = rayjobs("overlays/cpu-small")
    assert nightly["metadata"]["name"] == "presso-nightly" and nightly["spec"]["suspend"] is True
    assert nightly["spec"]["rayClusterSpec"] == small["spec"]["rayClusterSpec"]
    argv = shlex.split(nightly["spec"]["entrypoint"])
    assert "tracking.experiment=nightly" in argv
    assert not any(a.startswith("run.name=") for a in argv)  # the CronJob appends the night's
    (cron,) = [o for o in render("schedule") if o["kind"] == "CronJob"]
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "get rayjob presso-nightly -o json" in script


def test_dockerfile_pins_the_makefiles_torch():
    """The image's torch is the one the test suite runs with (a newer one pulls CUDA builds)."""
    makefile = re.search(r"^TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    dockerfile = re.search(r"^ARG TORCH=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)[1]
    assert dockerfile == makefile


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_pod_passes_pod_security_restricted(folder):
    """A namespace labelled pod-security.kubernetes.io/enforce=restricted admits every pod these
    manifests make, the ones KubeRay makes from a RayJob (head, workers, submitter) included."""
    found = [
        f"{where}: {p}"
        for obj in render(folder)
        for where, spec in pod_specs(obj)
        for p in restricted_violations(spec)
    ]
    assert found == []


def _head(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def _head_container(rayjob: dict) -> dict:
    return _head(rayjob)["containers"][0]["securityContext"]


# (what the check must then say, how to undo one setting of cpu-small's RayJob)
POD_SECURITY_MUTATIONS = [
    (
        "allowPrivilegeEscalation must be false",
        lambda j: _head_container(j).pop("allowPrivilegeEscalation"),
    ),
    ("capabilities.drop must include ALL", lambda j: _head_container(j).pop("capabilities")),
    ("runAsNonRoot is None", lambda j: _head(j)["securityContext"].pop("runAsNonRoot")),
    ("runAsUser must not be 0", lambda j: _head(j)["securityContext"].update(runAsUser=0)),
    (
        "seccompProfile is {'type': 'Unconfined'}",
        lambda j: _head(j)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    ),
    (
        "volume h: hostPath",
        lambda j: _head(j)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    ),
    ("hostNetwork must not be true", lambda j: _head(j).update(hostNetwork=True)),
    # without its own template, KubeRay's default submitter pod (no securityContext) runs
    (
        "submitter: containers[ray-job-submitter]: securityContext.allowPrivilegeEscalation",
        lambda j: j["spec"].pop("submitterPodTemplate"),
    ),
]


@pytest.mark.parametrize(("expected", "mutate"), POD_SECURITY_MUTATIONS)
def test_the_restricted_check_can_fail(expected, mutate):
    """Each rule the manifests rely on is really checked: undoing one setting is caught."""
    job = copy.deepcopy(rayjobs("overlays/cpu-small")[0])
    mutate(job)
    found = [f"{where}: {p}" for where, spec in pod_specs(job) for p in restricted_violations(spec)]
    assert any(expected in p for p in found), found


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_container_requests_ephemeral_storage(folder):
    """Ray's logs, spilled objects and scratch go to the node's disk: a pod must ask for it, or
    the scheduler may put it where the kubelet evicts it for lack of disk."""
    for where, c in all_containers(folder):
        resources = c.get("resources", {})
        assert "ephemeral-storage" in resources.get("requests", {}), where
        assert "ephemeral-storage" in resources.get("limits", {}), where


def test_production_pins_images_by_digest_and_names_storage_classes():
    """In production an image is what its digest says (a tag can be moved); every volume is on a
    named storage class, and the runs volume, shared across nodes, is ReadWriteMany."""
    images = {c["image"] for _, c in all_containers("overlays/production")}
    assert images and all(re.fullmatch(r"[\w./-]+@sha256:[0-9a-f]{64}", i) for i in images), images
    claims = [o for o in render("overlays/production") if o["kind"] == "PersistentVolumeClaim"]
    assert {c["metadata"]["name"] for c in claims} == {"presso-runs", "presso-mlflow"}
    assert all(c["spec"].get("storageClassName") for c in claims), claims
    runs = next(c for c in claims if c["metadata"]["name"] == "presso-runs")
    assert runs["spec"]["accessModes"] == ["ReadWriteMany"]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what these policies use
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _pod_labels(folder: str) -> dict[str, dict]:
    """The labels of every pod template a folder makes, by where it is."""
    out = {}
    for obj in render(folder):
        spec = obj.get("spec", {})
        if obj["kind"] == "Deployment":
            out[obj["metadata"]["name"]] = spec["template"]["metadata"]["labels"]
        if obj["kind"] == "RayJob":
            cluster = spec["rayClusterSpec"]
            out["head"] = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
            for g in cluster["workerGroupSpecs"]:
                out[f"worker {g['groupName']}"] = g["template"]["metadata"]["labels"]
            out["submitter"] = spec["submitterPodTemplate"]["metadata"]["labels"]
    return out


def test_network_policies_admit_only_presso_pods():
    """MLflow takes connections from presso's Ray pods only; the Ray pods from each other, and
    their dashboard / Jobs API (8265) from the job submitter and the KubeRay operator only."""
    pods = {**_pod_labels("overlays/cpu-small"), **_pod_labels("mlflow")}
    policies = {
        o["metadata"]["name"]: o["spec"]
        for o in render("overlays/production")
        if o["kind"] == "NetworkPolicy"
    }
    assert set(policies) == {"presso-mlflow", "presso-ray"}
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress"]  # without it, an ingress list restricts nothing

    mlflow = policies["presso-mlflow"]
    assert [p for p, labels in pods.items() if _selects(mlflow["podSelector"], labels)] == [
        "presso-mlflow"
    ]
    (rule,) = mlflow["ingress"]
    (peer,) = rule["from"]
    assert {p for p, labels in pods.items() if _selects(peer["podSelector"], labels)} >= {
        "head",
        "worker cpu",
    }
    assert rule["ports"] == [{"port": 5000, "protocol": "TCP"}]

    ray = policies["presso-ray"]
    selected = {p for p, labels in pods.items() if _selects(ray["podSelector"], labels)}
    assert selected == {"head", "worker cpu"}
    among_ray, dashboard = ray["ingress"]
    assert "ports" not in among_ray  # Ray uses many ports between its own pods
    assert {
        p for p, labels in pods.items() if _selects(among_ray["from"][0]["podSelector"], labels)
    } == selected
    assert dashboard["ports"] == [{"port": 8265, "protocol": "TCP"}]
    submitter, operator = dashboard["from"]
    assert (
        _selects(submitter["podSelector"], pods["submitter"])
        and "namespaceSelector" not in submitter
    )
    assert operator["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
    }


def test_mlflow_runs_behind_basic_auth_with_credentials_from_a_secret():
    """No anonymous access to the tracking server, and no credential in the repository: the
    admin and the CSRF key come from a Secret the operator creates (k8s/README.md)."""
    objects = render("overlays/production")
    assert not [o for o in objects if o["kind"] == "Secret"]
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in c["command"]
    assert {"secretRef": {"name": "presso-mlflow-admin"}} in c["envFrom"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert not any("PASSWORD" in k or "SECRET" in k for k in env)
    config = next(o for o in objects if o["metadata"]["name"] == "presso-mlflow-auth-config")
    ini = config["data"]["basic_auth.ini"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"].endswith("/basic_auth.ini")
    assert "password" not in ini.lower()
    # the users live on the server's volume, not in the container's disposable layer
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "data")
    assert re.search(rf"database_uri = sqlite:///{re.escape(mount)}/", ini)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"  # the one unprotected route


def test_image_records_its_commit_and_lets_uid_1000_write_its_work_dir():
    """The image runs as uid 1000 from /app: a relative run.output_dir is created there, so /app
    must be that user's. .git stays out of the image, so the commit comes as a build argument
    that the runs read back ($PRESSO_GIT_COMMIT, see tests/orchestrator/test_provenance.py)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert ".git" in (REPO / ".dockerignore").read_text().split()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    assert re.search(r"^RUN .*chown ray /app\b", dockerfile, re.M)
    assert dockerfile.index("chown ray /app") < dockerfile.index("USER 1000")
    assert re.search(r"^ARG GIT_COMMIT", dockerfile, re.M)
    assert re.search(r"^ENV PRESSO_GIT_COMMIT=\$GIT_COMMIT$", dockerfile, re.M)
