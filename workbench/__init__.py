"""OISD workbench: interpretability and analysis for RL post-training of language models.

The analysis library, in rooms by concern; imports flow one way, from the front door down:

- ``cli``, ``api``, ``compare``: the front door (the ``oisd`` command, the notebook API,
  ``oisd compare``);
- ``analysis``: orchestration (probe plumbing shared with the trainer, the TransformerLens
  analyzer, checkpoints trained elsewhere);
- ``models``: model input (loading, the lens read-out, sampling);
- ``measures``: what is measured (divergences, probe metrics, drift, summaries);
- ``storage``: the run folder on disk;
- ``errors``: the one-line errors every room raises.
"""

__version__ = "0.1.0"
