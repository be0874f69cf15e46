"""The Pod Security Standards' "restricted" profile, as published for Kubernetes 1.32
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), checked on pod specs.

The API server's PodSecurity admission enforces these rules on pods; a RayJob, Deployment or
CronJob that violates them is accepted, and only its pods are refused later. So the rules are
checked here on every pod template the manifests render, including the ones KubeRay makes from
a RayJob: the head and worker templates, and the submitter pod (KubeRay's default submitter has
no securityContext at all, so a RayJob without ``submitterPodTemplate`` fails).

Each rule is one function of a pod spec returning its violations; "restricted" includes every
"baseline" rule.
"""

from __future__ import annotations

from collections.abc import Iterator

# Baseline: capabilities a container may add; restricted narrows this to NET_BIND_SERVICE.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def _containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            yield f"{key}[{c.get('name')}]", c


def _contexts(spec: dict) -> Iterator[tuple[str, dict]]:
    """The pod's securityContext, then each container's."""
    yield "pod", spec.get("securityContext") or {}
    for where, c in _containers(spec):
        yield where, c.get("securityContext") or {}


def host_namespaces(spec: dict) -> list[str]:
    return [f"{k} must not be true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]


def privileged(spec: dict) -> list[str]:
    return [
        f"{where}: privileged must not be true"
        for where, c in _containers(spec)
        if (c.get("securityContext") or {}).get("privileged")
    ]


def host_process(spec: dict) -> list[str]:
    return [
        f"{where}: windowsOptions.hostProcess must not be true"
        for where, ctx in _contexts(spec)
        if (ctx.get("windowsOptions") or {}).get("hostProcess")
    ]


def host_paths_and_ports(spec: dict) -> list[str]:
    found = [
        f"volume {v.get('name')}: hostPath" for v in spec.get("volumes") or [] if "hostPath" in v
    ]
    for where, c in _containers(spec):
        found += [
            f"{where}: hostPort {p['hostPort']}" for p in c.get("ports") or [] if p.get("hostPort")
        ]
    return found


def apparmor_selinux_proc_sysctls(spec: dict) -> list[str]:
    found = []
    for where, ctx in _contexts(spec):
        profile = (ctx.get("appArmorProfile") or {}).get("type")
        if profile not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{where}: appArmorProfile.type {profile}")
        selinux = ctx.get("seLinuxOptions") or {}
        if (
            selinux.get("type", "") not in SELINUX_TYPES
            or selinux.get("user")
            or selinux.get("role")
        ):
            found.append(f"{where}: seLinuxOptions {selinux}")
        if ctx.get("procMount") not in (None, "Default"):
            found.append(f"{where}: procMount {ctx['procMount']}")
    sysctls = (spec.get("securityContext") or {}).get("sysctls") or []
    found += [
        f"pod: sysctl {s['name']} is not safe" for s in sysctls if s["name"] not in SAFE_SYSCTLS
    ]
    return found


def volume_types(spec: dict) -> list[str]:
    found = []
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {v.get('name')}: type {sorted(kinds)} is not allowed")
    return found


def privilege_escalation(spec: dict) -> list[str]:
    return [
        f"{where}: securityContext.allowPrivilegeEscalation must be false"
        for where, c in _containers(spec)
        if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False
    ]


def _pod_or_every_container(spec: dict, field: str, ok) -> list[str]:
    """A field set on the pod holds for every container that does not set it itself."""
    pod = (spec.get("securityContext") or {}).get(field)
    found = []
    for where, c in _containers(spec):
        value = (c.get("securityContext") or {}).get(field, pod)
        if not ok(value):
            found.append(f"{where}: {field} is {value!r} (set on the pod or the container)")
    if pod is not None and not ok(pod):
        found.append(f"pod: {field} is {pod!r}")
    return found


def non_root(spec: dict) -> list[str]:
    found = _pod_or_every_container(spec, "runAsNonRoot", lambda v: v is True)
    for where, ctx in _contexts(spec):
        if ctx.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser must not be 0")
    return found


def seccomp(spec: dict) -> list[str]:
    return _pod_or_every_container(
        spec, "seccompProfile", lambda v: (v or {}).get("type") in ("RuntimeDefault", "Localhost")
    )


def capabilities(spec: dict) -> list[str]:
    found = []
    for where, c in _containers(spec):
        caps = (c.get("securityContext") or {}).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            found.append(f"{where}: capabilities.drop must include ALL")
        added = set(caps.get("add") or [])
        if added - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities.add {sorted(added)} beyond NET_BIND_SERVICE")
        if added - BASELINE_CAPABILITIES:
            found.append(f"{where}: capabilities.add {sorted(added - BASELINE_CAPABILITIES)}")
    return found


RULES = [
    host_process,
    host_namespaces,
    privileged,
    host_paths_and_ports,
    apparmor_selinux_proc_sysctls,
    volume_types,
    privilege_escalation,
    non_root,
    seccomp,
    capabilities,
]


def restricted_violations(spec: dict) -> list[str]:
    """Why PodSecurity admission at level "restricted" would refuse a pod with this spec."""
    return [problem for rule in RULES for problem in rule(spec)]


def _kuberay_default_submitter(rayjob: dict) -> dict:
    """The submitter pod KubeRay makes when a K8sJobMode RayJob gives no template (v1.7.0:
    the head's image, resources, restartPolicy Never, and nothing else)."""
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    image = head["containers"][0]["image"]
    return {"restartPolicy": "Never", "containers": [{"name": "ray-job-submitter", "image": image}]}


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """Every pod spec ``obj`` makes, directly or through an operator, named by where it is."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    name = f"{kind}/{obj['metadata'].get('name')}"
    if kind == "Pod":
        yield name, spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield name, spec["template"]["spec"]
    elif kind == "CronJob":
        yield name, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("RayJob", "RayCluster"):
        cluster = spec.get("rayClusterSpec", spec) if kind == "RayJob" else spec
        if cluster:
            yield f"{name} head", cluster["headGroupSpec"]["template"]["spec"]
            for group in cluster.get("workerGroupSpecs") or []:
                yield f"{name} worker {group['groupName']}", group["template"]["spec"]
        if kind == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            template = spec.get("submitterPodTemplate")
            submitter = template["spec"] if template else _kuberay_default_submitter(obj)
            yield f"{name} submitter", submitter
