"""Two pipelines registering the same model at once, against a real `mlflow server`.

MLflow cannot set an alias conditionally, so presso's policy reads, writes and reads again
(``model_registry._settle``). The first test forces the interleaving that loses an update when
the policy only reads the champion and then writes: the worse version decides first, is slowed
down (as by a slow network) until the better one has finished, and then writes. The second lets
four registrations race freely.
"""

import random
import threading

import pytest
from mlflow.tracking import MlflowClient

from presso.orchestrator.model_registry import CANDIDATE, CHAMPION, apply_alias_policy

pytestmark = pytest.mark.integration


def _new_versions(client, name: str, n: int) -> list[str]:
    """``n`` versions of a new registered model, each with a run of its own as its source."""
    client.create_registered_model(name)
    experiment = client.create_experiment(f"{name}-runs")
    versions = []
    for _ in range(n):
        run = client.create_run(experiment)
        source = f"{run.info.artifact_uri}/model"
        versions.append(client.create_model_version(name, source, run_id=run.info.run_id).version)
    return [str(v) for v in versions]


class SlowChampionWrites:
    """A real client whose first ``champion`` write waits until ``release`` is set, having first
    signalled ``waiting``: the write of a decision made before the other registration ran."""

    def __init__(self, client, waiting: threading.Event, release: threading.Event) -> None:
        self._client, self._waiting, self._release = client, waiting, release
        self._held = False

    def __getattr__(self, attr):
        return getattr(self._client, attr)

    def set_registered_model_alias(self, name, alias, version):
        if alias == CHAMPION and not self._held:
            self._held = True
            self._waiting.set()
            assert self._release.wait(timeout=120)
        return self._client.set_registered_model_alias(name, alias, version)


def test_a_late_write_of_a_worse_version_does_not_keep_champion(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    worse, better = _new_versions(client, "race", 2)
    waiting, release = threading.Event(), threading.Event()
    results = {}

    def register(key, c, version, ppl):
        try:
            results[key] = apply_alias_policy(c, "race", version, ppl)
        except Exception as e:  # a thread's error must fail the test, not only warn
            results[key] = e

    slow = threading.Thread(
        target=register, args=("worse", SlowChampionWrites(client, waiting, release), worse, 12.0)
    )
    slow.start()
    assert waiting.wait(timeout=120)  # the worse one has decided to take champion; not yet written
    register("better", MlflowClient(mlflow_server.uri), better, 9.0)
    release.set()
    slow.join(timeout=120)
    champion = client.get_model_version_by_alias("race", CHAMPION)
    assert str(champion.version) == better
    assert results == {"better": True, "worse": False}
    assert str(client.get_model_version_by_alias("race", CANDIDATE).version) == better


def test_concurrent_registrations_leave_champion_on_the_best(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    versions = _new_versions(client, "free-for-all", 4)
    ppls = random.Random(0).sample([8.0, 9.0, 10.0, 11.0], 4)
    barrier = threading.Barrier(len(versions))
    results = {}

    def register(version, ppl):
        barrier.wait(timeout=60)
        client = MlflowClient(mlflow_server.uri)
        try:
            results[version] = apply_alias_policy(client, "free-for-all", version, ppl)
        except Exception as e:  # a thread's error must fail the test, not only warn
            results[version] = e

    threads = [threading.Thread(target=register, args=vp) for vp in zip(versions, ppls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    best = versions[ppls.index(min(ppls))]
    assert set(results) == set(versions) and all(isinstance(r, bool) for r in results.values())
    assert str(client.get_model_version_by_alias("free-for-all", CHAMPION).version) == best
    assert [v for v, champion in results.items() if champion] == [best]
    assert str(client.get_model_version_by_alias("free-for-all", CANDIDATE).version) == versions[-1]
