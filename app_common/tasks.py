"""The Celery contract between the API (producer) and the worker (consumer).

The API sends the task by name with one argument, the job id, so it never imports the worker;
everything else about the job lives in its record in Redis.
"""

RUN_JOB_TASK = "anytime_prune.run_job"
