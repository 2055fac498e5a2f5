"""The Celery contract (torch-free and free of pydantic-settings, so a client-only install can
import it) between the API (producer) and the worker (consumer).

The API sends the task by name with one argument, the job id, so it never imports the worker;
everything else about the job lives in its record in Redis.
"""

from typing import Literal, get_args

RUN_JOB_TASK = "anytime_prune.run_job"

# The training queues a worker consumes: ``gpu`` for CUDA jobs, ``cpu`` for the rest.
QueueName = Literal["cpu", "gpu"]
QUEUE_NAMES: tuple[str, ...] = get_args(QueueName)

# Light work off the training queues (dataset validation): a training worker busy for an hour
# must not make an upload wait.
VALIDATE_DATASET_TASK = "anytime_prune.validate_dataset"
CONTROL_QUEUE = "control"
