"""OISD workbench: interpretability and analysis for RL post-training of language models.

The analysis library: metric math (one implementation, shared by the trainer's
built-in probes and the TransformerLens analyzer), the run store, model loading,
and the ``oisd`` command line.
"""

__version__ = "0.1.0"
