"""Print how the installed packages differ from a pip-compile lock (for `make test-latest`).

Usage: python .ci/lock_drift.py requirements.lock — always exits 0: it reports, the tests judge.
"""

import importlib.metadata
import re
import sys


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: str) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", open(path).read(), re.M)
    return {canonical(name): version for name, version in pins}


def main(path: str) -> None:
    lock = locked(path)
    installed = {
        canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }
    changed = [
        f"  {name}: {lock[name]} (lock) -> {version}"
        for name, version in sorted(installed.items())
        if name in lock and lock[name] != version
    ]
    added = [
        f"  {name} {version}" for name, version in sorted(installed.items()) if name not in lock
    ]
    print(f"newest allowed versions vs {path}: {len(changed)} changed")
    print("\n".join(changed) or "  (none)")
    print("installed but not in the lock (torch is installed apart, presso is this checkout):")
    print("\n".join(added) or "  (none)")


if __name__ == "__main__":
    main(sys.argv[1])
