"""The run folder on disk: where every file is (``paths``), reading a run (``runstore``),
writing one (``runwriter``), checkpoints and their manifests (``checkpoints``), atomic
writes (``atomic``), JSON lines (``jsonl``) and the column contracts of every table
(``schema``). Nothing here runs a model. It imports nothing of the workbench but
``workbench.errors``; every other room reads and writes run folders through it.
"""
