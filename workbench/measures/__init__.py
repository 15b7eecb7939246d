"""What the workbench measures, as functions of tensors and tables: divergences
(``divergence``), the probe metrics of docs/metrics.md (``metrics``, and ``probing`` over a
batch of probe sequences), weight drift (``drift``), and the summaries the trainer, ``oisd
compare`` and the dashboard share (``summary``). Nothing here loads a model or walks a run
folder; it reads ``workbench.storage.schema`` for the tables' columns.
"""
