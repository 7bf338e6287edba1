"""What a user runs: the train driver, generate, evaluate, promote, bench and data push.

A command parses nothing itself (that is `job.cli`) and trains nothing itself (that is
`job.runtime`); it checks its input, calls into the runtime and storage, and reports.
"""
