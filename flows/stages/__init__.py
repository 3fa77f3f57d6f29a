"""The pipeline's stages, one module each, in the order `flows.pipeline` runs them.

Each stage takes the run's `RunContext`, records its timing with `ctx.stage(name)`, and returns a typed
result (`flows.results`) that Prefect persists under a key of the stage's inputs, so a re-run of the same
spec and run name skips what finished. A new stage is a module here and one line in `pipeline()`.
"""
