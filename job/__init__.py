"""The gan-job batch job: CLI, configuration, Ray Train wiring, checkpoints and storage.

Ray, boto3 and pyarrow are imported lazily, so that commands which need neither run without them.
"""
