"""What `tasks.py` (Invoke) does, as importable and testable code: runs on the user's laptop or a CI runner.

Mutating tasks build a `Plan` first (argv lists, files to write, checks to pass), print it under --dry-run
and run it otherwise. Needs only the base install (invoke, kubernetes, pyyaml) plus kubectl / docker /
git on PATH; never imports torch, transformers, LLaMA-Factory or MLflow.
"""
