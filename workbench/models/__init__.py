"""Model input: what a model folder is and how one is loaded (``loading``), the read-out
of the residual stream as a distribution (``readout``: the :class:`~workbench.models.readout.Lens`
interface, the logit lens and the learned affine lens), and batched sampling with a KV
cache (``generation``: rollouts, greedy and sampled probes, evaluation).
"""
