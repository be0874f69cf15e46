"""A pool of Ray actors for the compress stage, which survives the death of its workers.

Each task is a module-level function and its arguments, pre-assigned to a worker (the caller
balances the load). A task whose worker dies — killed, out of memory, its node gone — is given to
the least-loaded live worker, or to a fresh one when none is left, so the results are the same as
without the failure: every task is a pure function of its arguments. The pool can run many
batches of tasks (``run`` again); later batches should be assigned over :meth:`live` workers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from presso import ClusterError, PressoError


@dataclass
class Task:
    worker: int  # the worker it is assigned to
    fn: object  # a module-level function (Ray pickles it by reference)
    args: tuple


def _actor_class():
    import ray

    @ray.remote(num_cpus=1, max_restarts=0)
    class PoolWorker:
        def __init__(self, threads: int, fault_after: int | None) -> None:
            import torch

            import presso.orchestrator.compress  # noqa: F401  (the tasks' module, imported while
            # the driver prepares the first batch rather than when the first task arrives)

            torch.set_num_threads(threads)
            self.done, self.fault_after = 0, fault_after

        def call(self, fn, *args):
            """``fn(*args)`` and the seconds it took (the worker's busy time)."""
            if self.fault_after is not None and self.done == self.fault_after:
                print(f"presso: fault injection: compression worker exits after {self.done} tasks")
                os._exit(17)
            self.done += 1
            tick = time.perf_counter()
            result = fn(*args)
            return result, time.perf_counter() - tick

    return PoolWorker


def _fault(spec: str | None) -> tuple[int, int] | None:
    """``PRESSO_INJECT_COMPRESS_FAULT="WORKER:N"``: that worker dies before its task N+1 (tests)."""
    if not spec:
        return None
    worker, after = spec.split(":")
    return int(worker), int(after)


class WorkerPool:
    def __init__(self, size: int, threads: int = 1) -> None:
        import ray

        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < size:  # each worker holds a CPU until the pool closes: the rest would never start
            raise ClusterError(
                f"compress.workers: {size} compression workers, but the Ray cluster has "
                f"{cpus:g} CPUs (each worker holds one); ask for at most {cpus:g}"
            )
        fault = _fault(os.environ.get("PRESSO_INJECT_COMPRESS_FAULT"))
        self.cls = _actor_class()
        self.threads = threads
        self.actors = [
            self.cls.remote(threads, fault[1] if fault and fault[0] == w else None)
            for w in range(size)
        ]
        self.alive = [True] * size
        self.reassigned = 0  # tasks moved off a dead worker
        self.busy_s = [0.0] * size  # seconds each worker spent inside tasks

    def live(self) -> list[int]:
        """Indices of the workers not known to be dead."""
        return [w for w, ok in enumerate(self.alive) if ok]

    def run(self, tasks: list[Task], on_result=None) -> list:
        """Results in task order; ``on_result(index, result)`` as each one arrives.

        A task that raises a presso error (e.g. NaN calibration inputs) re-raises it here as
        itself, so the user sees its message rather than a remote traceback.
        """
        import ray

        results: list = [None] * len(tasks)
        pending = {self._submit(t.worker, t): i for i, t in enumerate(tasks)}
        load = [0] * len(self.actors)
        for t in tasks:
            load[t.worker] += 1
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                results[i], seconds = ray.get(ref)
            except ray.exceptions.RayActorError:
                dead = tasks[i].worker
                self.alive[dead] = False
                worker = self._replacement(load)
                print(f"presso: compression worker {dead} died; task {i} goes to worker {worker}")
                tasks[i] = Task(worker, tasks[i].fn, tasks[i].args)
                load[worker] += 1
                self.reassigned += 1
                pending[self._submit(worker, tasks[i])] = i
                continue
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, PressoError):
                    raise e.cause from None
                raise
            self.busy_s[tasks[i].worker] += seconds
            load[tasks[i].worker] -= 1
            if on_result is not None:
                on_result(i, results[i])
        return results

    def _submit(self, worker: int, task: Task):
        return self.actors[worker].call.remote(task.fn, *task.args)

    def _replacement(self, load: list[int]) -> int:
        live = self.live()
        if live:
            return min(live, key=lambda w: (load[w], w))
        self.actors.append(self.cls.remote(self.threads, None))
        self.alive.append(True)
        self.busy_s.append(0.0)
        load.append(0)
        return len(self.actors) - 1

    def close(self) -> None:
        import ray

        for actor, ok in zip(self.actors, self.alive):
            if ok:
                ray.kill(actor)
