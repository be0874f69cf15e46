"""The model registry side: log a packed artifact as a pyfunc model, register it, and keep the
aliases honest — every version is ``candidate``; ``champion`` goes to the best test perplexity.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import presso

CANDIDATE, CHAMPION = "candidate", "champion"
PPL_TAG = "eval.compressed_ppl"  # the model version's test perplexity, which the policy compares
MODEL_NAME = "compressed-model"  # the model's name within its run


@dataclass(frozen=True)
class Registered:
    version: str | None  # the model version; None while the registration waits in the spool
    champion: bool  # whether this version took the champion alias


def promotes(perplexity: float | None, champion: float | None) -> bool:
    """The alias policy: the first version becomes champion (``champion`` None: there is none);
    a later one only with a lower test perplexity. Unknown or NaN never beats a known one."""
    if champion is None:
        return True
    return perplexity is not None and math.isfinite(perplexity) and perplexity < champion


def _perplexity(version) -> float:
    """A version's test perplexity; inf if its tag is missing, unreadable or not finite."""
    try:
        value = float(version.tags[PPL_TAG])
    except (KeyError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def _versions(client, name: str) -> list:
    """Every version of the registered model ``name``, oldest first, with its tags."""
    quote = "'" if "'" not in name else '"'
    found = client.search_model_versions(f"name = {quote}{name}{quote}")
    return sorted(found, key=lambda v: int(v.version))


def _champion_of(versions: list, current: str | None) -> str | None:
    """Who should hold ``champion``: starting from the version that holds it now, each version,
    oldest first, that :func:`promotes` over the holder takes it."""
    by_number = {str(v.version): v for v in versions}
    holder = by_number.get(current) if current is not None else None
    best = None if holder is None else (holder.version, _perplexity(holder))
    for v in versions:
        ppl = _perplexity(v) if PPL_TAG in v.tags else None
        if promotes(ppl, None if best is None else best[1]):
            best = (v.version, _perplexity(v))
    return None if best is None else str(best[0])


def _newest(versions: list, current: str | None) -> str | None:
    return str(versions[-1].version) if versions else current


# Two registrations a few hundred ms apart are common (a sweep, two pipelines); a livelock of
# more rounds than this is not: each round ends with the alias on the best version it saw.
_SETTLE_ROUNDS = 20


def _settle(client, name: str, alias: str, choose) -> str | None:
    """Compare-and-set on an alias, which MLflow cannot do atomically: read every version and
    the alias, move it to ``choose(versions, holder)``, and read again until the alias already
    names that. Every registration tags its version before it settles, so the last write of any
    registration is followed by a read that sees every version tagged before it: concurrent
    registrations end with the alias where one after the other would have left it."""
    from mlflow.exceptions import MlflowException

    refused = None
    for _ in range(_SETTLE_ROUNDS):
        holder = client.get_registered_model(name).aliases.get(alias)
        holder = None if holder is None else str(holder)
        chosen = choose(_versions(client, name), holder)
        if chosen is None or chosen == holder:
            return holder
        try:
            client.set_registered_model_alias(name, alias, chosen)
        except MlflowException as e:
            # Two first writes of an alias collide in the server's store (a unique constraint):
            # the other one won; read again. Any other refusal repeats, and is raised below.
            refused = e
    if refused is not None:
        raise refused
    raise RuntimeError(f"registry {name}: alias {alias} still moving after {_SETTLE_ROUNDS} rounds")


INPUT_EXAMPLE = [[1, 2, 3, 4]]  # token ids of one sequence: predict returns its next-token logits


def serving_requirements(wheel: Path | None) -> list[str]:
    """What serving the model needs: presso (the wheel in the model's ``code/`` folder, or a
    version no index has when presso runs from no checkout) and the versions it ran with of
    what loading an artifact imports."""
    import safetensors
    import torch
    import transformers

    own = f"code/{wheel.name}" if wheel else f"presso=={presso.__version__}"
    return [
        own,
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"safetensors=={safetensors.__version__}",
    ]


def log_and_register(
    client, uri: str, run_id: str, artifact: Path, name: str, ppl: float | None
) -> Registered:
    """Log ``artifact`` to the run as a pyfunc model, register it under ``name``, set aliases."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

    import presso.orchestrator.mlflow_model as model_code
    from presso.orchestrator.wheel import build_wheel

    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        wheel = build_wheel(Path(tmp))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=model_code.__file__,
            artifacts={"packed": str(artifact)},
            code_paths=[str(wheel)] if wheel else None,
            pip_requirements=serving_requirements(wheel),
            input_example=INPUT_EXAMPLE,
        )
    # Registered through the client rather than log_model(registered_model_name=...), which
    # prints its own lines to stderr; presso's summary says what was registered.
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in {
            ErrorCode.Name(RESOURCE_ALREADY_EXISTS),
            ErrorCode.Name(ALREADY_EXISTS),
        }:
            raise
    created = client.create_model_version(
        name, info.model_uri, run_id=run_id, model_id=info.model_id
    )
    version = str(created.version)
    return Registered(version, apply_alias_policy(client, name, version, ppl))


def apply_alias_policy(client, name: str, version: str, perplexity: float | None) -> bool:
    """Tag a new model version with its perplexity, then settle the aliases: ``candidate`` on the
    newest version, ``champion`` as :func:`promotes` decides, safe against other registrations
    of the same model at the same time. Returns whether this version holds ``champion``."""
    if perplexity is not None:
        client.set_model_version_tag(name, version, PPL_TAG, repr(perplexity))
    _settle(client, name, CANDIDATE, _newest)
    return _settle(client, name, CHAMPION, _champion_of) == str(version)
