"""Recipes: the whole of prep, train and sweep as one plain function each, called by the CLI, the tests and jobs.

Each reads top to bottom: compose nothing (it takes a ``Config``), assume Ray is initialised, return what it made.
A new workflow (e.g. multi-stage SFT) is a new module here that composes these.
"""
