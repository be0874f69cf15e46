#!/usr/bin/env python3
"""A stand-in for kubectl with an API server in a folder, for testing the nightly CronJob's
script where no cluster exists. It knows exactly the calls that script makes, and fails loudly
on any other.

$FAKE_KUBE holds: ``objects.json`` (RayJobs by name), ``statuses.json`` (the status each poll of
the night's job returns next, in order; the last one stays), ``fail.json`` (how many of the next
calls of each verb fail as an unreachable API server would; ``poll`` counts the status reads),
``created.jsonl`` (every object created) and ``calls.log`` (every call).
"""

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_KUBE"])


def load(name, default):
    path = ROOT / name
    return json.loads(path.read_text()) if path.is_file() else default


def save(name, value):
    (ROOT / name).write_text(json.dumps(value))


def option(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def merge(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def jsonpath(obj, template):
    def field(match):
        node = obj
        for key in match.group(1).split("."):
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return "" if node == {} else str(node)

    return re.sub(r"\{\.([\w.]+)\}", field, template)


def main(args):
    with open(ROOT / "calls.log", "a") as log:
        log.write(" ".join(args) + "\n")
    verb = args[0]
    if verb == "get" and any("jobDeploymentStatus" in a for a in args):
        verb = "poll"
    fail = load("fail.json", {})
    if fail.get(verb, 0) > 0:
        fail[verb] -= 1
        save("fail.json", fail)
        print("Unable to connect to the server: net/http: TLS handshake timeout", file=sys.stderr)
        return 1
    objects = load("objects.json", {})
    output = option(args, "-o")
    if verb == "patch" and "--local" in args:
        obj = json.loads(Path(option(args, "-f")).read_text())
        print(json.dumps(merge(obj, json.loads(option(args, "-p")))))
        return 0
    if verb == "create":
        obj = json.loads(Path(option(args, "-f")).read_text())
        name = obj["metadata"]["name"]
        if name in objects:
            print(f'rayjobs.ray.io "{name}" already exists', file=sys.stderr)
            return 1
        objects[name] = {**obj, "status": {}}
        save("objects.json", objects)
        with open(ROOT / "created.jsonl", "a") as f:
            f.write(json.dumps(obj) + "\n")
        print(f"rayjob.ray.io/{name}")
        return 0
    kind, name = args[1], args[2]
    if kind != "rayjob":
        raise SystemExit(f"fake kubectl: unexpected call {args}")
    obj = objects.get(name)
    if verb == "delete":
        objects.pop(name)
        save("objects.json", objects)
        return 0
    if verb not in ("get", "poll"):
        raise SystemExit(f"fake kubectl: unexpected call {args}")
    if obj is None:
        if "--ignore-not-found" in args:
            return 0
        print(f'rayjobs.ray.io "{name}" not found', file=sys.stderr)
        return 1
    if output == "name":
        print(f"rayjob.ray.io/{name}")
    elif output == "json":
        print(json.dumps(obj))
    elif output.startswith("jsonpath="):
        template = output.removeprefix("jsonpath=")
        if verb == "poll":  # the job moves on
            statuses = load("statuses.json", [])
            deployment, _, job = (statuses.pop(0) if len(statuses) > 1 else statuses[0]).partition(
                "/"
            )
            save("statuses.json", statuses)
            obj["status"] = {"jobDeploymentStatus": deployment, "jobStatus": job, "message": "m"}
            objects[name] = obj
            save("objects.json", objects)
        print(jsonpath(obj, template), end="")
    else:
        raise SystemExit(f"fake kubectl: unexpected output {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
