"""Orchestration: running models over probe sets and writing what they show. The probe
plumbing the trainer's built-in probes and the analyzer share (``probe_runner``), the
TransformerLens analyzer behind ``oisd probe`` (``analyzer``), what it walks over
(``targets``: a run's checkpoints and its start model), checkpoints trained elsewhere
(``external``), and the time and memory of a long probe (``memory``).
"""
