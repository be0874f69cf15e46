"""What a user reads when the workers of train or recover fail for good: the cause in one line
and how to go on, not Ray's "Training failed due to controller error:"."""

from ray.exceptions import OutOfMemoryError
from ray.train.v2.api.exceptions import ControllerError

from presso.orchestrator.train import _training_failure


def test_workers_killed_for_memory_say_so_and_what_to_do():
    """Ray's memory monitor kills the workers and the controller gives up; the message must name
    memory and the node's figures, and keep the way back (resume_from) as every failure does."""
    oom = OutOfMemoryError(
        "3 worker(s) were killed due to the node running low on memory.\n"
        "Memory on the node (IP: 10.0.0.5, ID: abc) was 22.06GB used / 23.54GB limit (0.937)\n"
        "Top memory users: ..."
    )
    message = str(_training_failure(ControllerError(oom), "recover", 1, "/runs/x/ray_recover"))
    assert message.startswith("recover: the node ran out of memory"), message
    assert "22.06GB used / 23.54GB limit" in message
    assert "fewer recover.workers" in message
    assert "recover.resume_from=/runs/x/ray_recover" in message
    assert "\n" not in message


def test_other_controller_errors_name_their_cause():
    message = str(_training_failure(ControllerError(RuntimeError("placement failed")), "train", 0, "c"))  # fmt: skip
    assert "RuntimeError: placement failed" in message and "train.resume_from=c" in message
