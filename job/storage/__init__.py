"""Where things are kept: locations (local or S3), checkpoints, run artifacts, the LATEST
pointer and the data source. Nothing here trains or knows about Ray Train.
"""
