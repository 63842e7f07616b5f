"""Recipes: the whole of prep, train, sweep (and its trial body) and multi-stage training as one plain function each,
called by the CLI, the tests and jobs.

Each reads top to bottom: compose nothing (it takes a ``Config``), assume Ray is initialised, return what it made.
A new workflow (e.g. multi-stage SFT) is a new module here that composes these.
"""
