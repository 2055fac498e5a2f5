"""One router per resource: jobs, artifacts, catalog, health."""
