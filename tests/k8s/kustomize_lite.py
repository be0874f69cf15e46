"""A small stand-in for `kustomize build`, for machines without kustomize or kubectl.

It supports exactly what the kustomizations under k8s/ use, and raises NotImplementedError on
anything else, so it cannot silently render something kustomize would render differently:

- ``resources``: YAML files, and folders holding a kustomization (rendered recursively);
- ``namespace``: set on every object (k8s/ has no cluster-scoped kinds);
- ``images``: ``name`` → ``newName`` / ``newTag`` / ``digest`` (which replaces the tag, as
  kustomize's does) in every ``containers``/``initContainers`` list at any depth (kustomize does
  the same for custom resources such as RayJob);
- ``patches``: JSON6902 operation lists (``add``, ``remove``, ``replace``) with a ``target``
  (``group``/``kind``/``name``), inline or from a file;
- ``configMapGenerator``: ``files`` entries with ``disableNameSuffixHash`` (a hash suffix would
  need kustomize's name-reference rewriting).

Wherever kubectl or kustomize exists, tests compare this with the real thing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "patches",
    "configMapGenerator",
}


def render(folder: Path) -> list[dict]:
    """The objects ``kustomize build folder`` would print, in no particular order."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization fields {sorted(unknown)}")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    objects += [_config_map(folder, g) for g in spec.get("configMapGenerator", [])]
    for patch in spec.get("patches", []):
        _apply_patch(folder, patch, objects)
    for image in spec.get("images", []):
        for obj in objects:
            _set_images(obj, image)
    if "namespace" in spec:
        for obj in objects:
            obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def _config_map(folder: Path, gen: dict) -> dict:
    if set(gen) - {"name", "files", "options"} or gen.get("options") != {
        "disableNameSuffixHash": True
    }:
        raise NotImplementedError(f"{folder}: configMapGenerator {gen}")
    data = {}
    for entry in gen["files"]:
        key, _, path = entry.rpartition("=")
        data[key or Path(path).name] = (folder / path).read_text()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": gen["name"]},
        "data": data,
    }


def _matches(obj: dict, target: dict) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    wanted = {"group": group, "kind": obj["kind"], "name": obj["metadata"].get("name")}
    if set(target) - set(wanted):
        raise NotImplementedError(f"patch target fields {sorted(set(target) - set(wanted))}")
    return all(wanted[k] == v for k, v in target.items())


def _apply_patch(folder: Path, patch: dict, objects: list[dict]) -> None:
    text = patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list) or "target" not in patch:
        raise NotImplementedError(f"{folder}: only JSON6902 patches with a target")
    targets = [o for o in objects if _matches(o, patch["target"])]
    if not targets:
        raise ValueError(f"{folder}: patch target {patch['target']} matches nothing")
    for obj in targets:
        for op in ops:
            _json6902(obj, op)


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _json6902(obj: dict, op: dict) -> None:
    *parents, last = _pointer(op["path"])
    node = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if op["op"] not in ("add", "remove", "replace"):
        raise NotImplementedError(f"JSON6902 op {op['op']}")
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op["op"] == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif op["op"] == "remove":
            del node[index]
        else:
            node[index] = copy.deepcopy(op["value"])
        return
    if op["op"] != "add" and last not in node:
        raise KeyError(f"{op['op']} {op['path']}: no such field")
    if op["op"] == "remove":
        del node[last]
    else:
        node[last] = copy.deepcopy(op["value"])


def _set_images(node, image: dict) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise NotImplementedError(f"images entry {image}")
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    container["image"] = _new_image(container["image"], image)
            _set_images(value, image)


def _new_image(current: str, image: dict) -> str:
    name, _, tag = current.rpartition(":") if ":" in current.split("/")[-1] else (current, "", "")
    if name != image["name"]:
        return current
    name = image.get("newName", name)
    if "digest" in image:
        return f"{name}@{image['digest']}"
    tag = image.get("newTag", tag)
    return name + (f":{tag}" if tag else "")
