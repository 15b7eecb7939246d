"""Reading the residual stream out as a next-token distribution: the lens.

A lens maps a hidden state after block ``l`` to logits over the vocabulary, in the spirit
of tuned-lens's ``Lens`` (``transform_hidden`` then the model's own unembedding)::

    lens(h, layer)  =  unembed(final_norm(transform_hidden(h, layer)))        # (..., V)

- :class:`LogitLens`: ``transform_hidden`` is the identity, so every layer is read through
  the model's final norm and unembedding unchanged (nostalgebraist 2020). The OISD loss
  trains exactly this read-out; the trainer, the built-in probes and the TransformerLens
  analyzer all read through it (:meth:`LogitLens.of_model` for an HF model,
  :meth:`LogitLens.of_bridge` for a ``TransformerBridge``).
- :class:`AffineLens`: a learned affine map per layer before the same final norm and
  unembedding (the tuned lens of Belrose et al. 2023, arXiv 2303.08112); the logit lens is
  its identity case. Fitted by :mod:`workbench.analysis.learned_lens`.

Applied to the last block's output, the logit lens reproduces the model's logits; every
consumer checks that before trusting an intermediate read-out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from workbench.models.structure import find_readout

__all__ = ["CHUNK_ELEMENTS", "READOUT_ROWS", "AffineLens", "Lens", "LogitLens", "read_out_layers",
           "readout_group", "vocab_chunk_rows"]

class Lens(ABC):
    """A read-out of the residual stream: ``lens(h, layer)`` maps hidden states ``(..., d)``
    after block ``layer`` (1-based; the output of block ``layer`` before the final norm) to
    logits ``(..., V)``.

    Attributes:
        name: what the metric tables call it (the ``lens`` column): ``"logit"``, ``"tuned"``.
    """

    name: str = "lens"

    @abstractmethod
    def transform_hidden(self, h: Tensor, layer: int) -> Tensor:
        """The hidden state the final norm and unembedding read (``h`` for the logit lens)."""

    @abstractmethod
    def unembed(self, h: Tensor) -> Tensor:
        """``(..., d) -> (..., V)``: the model's final norm, then its unembedding."""

    def __call__(self, h: Tensor, layer: int) -> Tensor:
        return self.unembed(self.transform_hidden(h, layer))

    def read_layers(self, hidden: list[Tensor], layers: list[int]) -> Tensor:
        """Several layers read out in one unembedding product: ``hidden[j]`` ``(c, d)`` after
        block ``layers[j]``, returned as one ``(len(layers) * c, V)`` block, layer by layer
        (rows ``j * c`` to ``(j + 1) * c`` are ``self(hidden[j], layers[j])``)."""
        return self.unembed(torch.cat([self.transform_hidden(h, layer) for h, layer in zip(hidden, layers)]))


class LogitLens(Lens):
    """The model's own read-out at every layer: ``unembed(norm(h))``.

    Args:
        norm: the final norm (a module or any ``(..., d) -> (..., d)`` function).
        head: the unembedding (``lm_head``, or a bridge's ``unembed``).
    """

    name = "logit"

    def __init__(self, norm: Callable[[Tensor], Tensor], head: Callable[[Tensor], Tensor]):
        self.norm, self.head = norm, head

    def transform_hidden(self, h: Tensor, layer: int) -> Tensor:
        return h

    def unembed(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))

    @classmethod
    def of_model(cls, model: nn.Module) -> "LogitLens":
        """The logit lens of an HF causal LM (:func:`find_readout`)."""
        return cls(*find_readout(model))

    @classmethod
    def of_bridge(cls, bridge) -> "LogitLens":
        """The logit lens of a TransformerLens ``TransformerBridge``: its ``ln_final`` then
        ``unembed`` (the wrapped HF modules, raw weights)."""
        return cls(bridge.ln_final, bridge.unembed)


class AffineLens(Lens):
    """A learned affine map per layer before the logit lens's read-out:
    ``unembed(norm(h + h A_l^T + b_l))`` (the tuned lens's translator, residual form, so
    that ``A_l = 0, b_l = 0`` is the logit lens). Layers without a translator are read as
    the logit lens reads them.

    Args:
        base: the logit lens whose norm and unembedding it reads through.
        translators: layer -> ``(A_l (d, d), b_l (d,))``.
        name: the ``lens`` column's value (``"tuned"``).
    """

    def __init__(self, base: LogitLens, translators: Mapping[int, tuple[Tensor, Tensor]], name: str = "tuned"):
        self.base, self.name = base, name
        self.translators = dict(translators)

    def transform_hidden(self, h: Tensor, layer: int) -> Tensor:
        if layer not in self.translators:
            return h
        weight, bias = self.translators[layer]
        return h + torch.nn.functional.linear(h, weight.to(h.dtype), bias.to(h.dtype))

    def unembed(self, h: Tensor) -> Tensor:
        return self.base.unembed(h)


#: Numbers per ``(rows, V)`` float32 block of a read-out done in row chunks, by purpose and
#: device type: the one decision of how large such a block is (:func:`vocab_chunk_rows`).
#:
#: - ``"loss"``, the trainer's chunked pass (each chunk recomputed in backward, a few blocks
#:   live): 32 MiB on CPU. glibc serves larger blocks with fresh ``mmap`` pages on every
#:   allocation (its threshold cannot exceed 32 MiB), so each pass over a larger tensor also
#:   pays its page faults (measured: elementwise passes 2-4x slower at 110+ rows of a 151,936
#:   vocabulary than at 55).
#: - ``"lens"``, the probes' lens statistics (no gradient, about seven blocks live at once):
#:   16 MiB on CPU. On a 32k vocabulary its 131 rows and 256 rows measured the same within
#:   noise; much smaller chunks lose read-out matmul efficiency, larger ones only cost memory.
#: - On a GPU, 128 MiB for both: the caching allocator reuses blocks, larger chunks make
#:   larger matrix products, and a launch-bound loop is what a GPU pays for.
CHUNK_ELEMENTS = {"loss": {"cpu": 1 << 23, "gpu": 1 << 25}, "lens": {"cpu": 1 << 22, "gpu": 1 << 25}}


#: Rows of one read-out matrix product on CPU. The lens statistics walk a few ``(chunk, V)``
#: blocks (``CHUNK_ELEMENTS["lens"]``: 27 rows at a 151,936 vocabulary), but a 27-row product
#: re-reads the whole ``(V, d)`` unembedding for 27 rows: measured at ``d = 1024``, 57 GFLOP/s
#: against 119 at 144 rows and 134 at 288. So several layers' chunks are read out in one
#: product of about this many rows (:func:`readout_group`), and the statistics then walk its
#: ``(chunk, V)`` slices. On a GPU the chunk itself is already this large.
READOUT_ROWS = 256


def readout_group(chunk_rows: int) -> int:
    """Layers read out together in one product when each brings ``chunk_rows`` rows."""
    return max(1, READOUT_ROWS // max(1, chunk_rows))


def read_out_layers(lens: Callable[[Tensor, int], Tensor], hidden: list[Tensor], layers: list[int]) -> Tensor:
    """``(len(layers) * c, V)``: each ``hidden[j]`` ``(c, d)`` read out at ``layers[j]``, stacked
    layer by layer; one product for a :class:`Lens` (:meth:`Lens.read_layers`), one call per
    layer for any other ``lens(h, layer)`` function."""
    if isinstance(lens, Lens):
        return lens.read_layers(hidden, layers)
    return torch.cat([lens(h, layer) for h, layer in zip(hidden, layers)])


def vocab_chunk_rows(vocab_size: int, device: str | torch.device = "cpu", purpose: str = "loss") -> int:
    """Rows per chunk of a read-out over a ``vocab_size`` vocabulary, so that one ``(rows, V)``
    float32 block holds :data:`CHUNK_ELEMENTS` ``[purpose]`` numbers on ``device`` (at least 1)."""
    kind = "cpu" if torch.device(device).type == "cpu" else "gpu"
    return max(1, CHUNK_ELEMENTS[purpose][kind] // max(1, vocab_size))
