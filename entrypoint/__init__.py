"""Entrypoint of the training image: `python -m entrypoint train|merge|webui|demo`.

Importing the package is cheap on purpose: heavy libraries are imported inside the command that
needs them, after validation and after the skip decision.
"""
