"""Where the pieces of an HF causal LM are: its decoder stack and blocks, its final norm and
unembedding. One lookup of each, generic over architectures (Llama / Qwen / Mistral:
``model.model.layers``, ``model.model.norm``; GPT-2: ``transformer.h``, ``transformer.ln_f``;
GPT-NeoX / OPT: ``final_layer_norm``), used by the trainer's forward pass, the logit lens
(:mod:`workbench.models.readout`) and early exit (:func:`exit_after`).
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from workbench.errors import CheckpointError

__all__ = ["FINAL_NORM_NAMES", "decoder_blocks", "decoder_stack", "exit_after", "find_readout"]

# Attribute names of the final norm on a decoder stack, across HF architectures
# (Llama/Qwen/Mistral: ``norm``; GPT-2/GPT-J/Bloom: ``ln_f``; GPT-NeoX/OPT: ``final_layer_norm``).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")



def find_readout(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The model's final norm and unembedding: the one lookup of an HF model's read-out,
    behind :meth:`LogitLens.of_model` (the built-in probes, the trainer's OISD loss).

    Generic over HF causal LMs: the unembedding is ``get_output_embeddings()``
    (``lm_head``); the final norm is the first of :data:`FINAL_NORM_NAMES` found on the
    decoder stack (``get_decoder()``, else the base model: ``model.model.norm`` for
    Llama/Qwen, ``model.transformer.ln_f`` for GPT-2, ...).

    Returns:
        ``(final_norm, lm_head)``.

    Raises:
        CheckpointError: either module cannot be found (one line naming what was looked for).
    """
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is None:
        raise CheckpointError(f"{type(model).__name__} has no output embeddings (lm_head) for the logit lens")
    stacks = [model.get_decoder()] if hasattr(model, "get_decoder") else []
    stacks.append(getattr(model, "base_model", None))
    for stack in stacks:
        for name in FINAL_NORM_NAMES:
            candidate = getattr(stack, name, None) if stack is not None else None
            if isinstance(candidate, nn.Module):
                return candidate, lm_head
    raise CheckpointError(
        f"cannot find the final norm of {type(model).__name__} for the logit lens "
        f"(looked for {', '.join(FINAL_NORM_NAMES)} on its decoder stack)"
    )


def decoder_stack(model: nn.Module) -> nn.Module:
    """The base transformer (embeddings + blocks + final norm) of a causal LM."""
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    return getattr(model, "base_model", model)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in order (``model.model.layers``, ``transformer.h``, ...).

    Raises:
        CheckpointError: no ModuleList of ``num_hidden_layers`` blocks in the decoder stack.
    """
    decoder = decoder_stack(model)
    expected = model.config.get_text_config().num_hidden_layers
    for child in decoder.children():
        if isinstance(child, nn.ModuleList) and len(child) == expected:
            return child
    raise CheckpointError(
        f"cannot find the {expected} decoder blocks of {type(model).__name__} "
        "(no ModuleList of that length in its base model)"
    )


@contextmanager
def exit_after(model: nn.Module, layer: int):
    """Inside the block, ``model`` runs blocks ``1..layer`` only, then its own final norm and
    unembedding: the logit lens at ``layer`` as the model's output (an early exit). The
    weights are shared, nothing is copied; the full stack is put back on exit.

    Raises:
        CheckpointError: ``layer`` is not one of ``1..L``.
    """
    blocks = decoder_blocks(model)
    if not 1 <= layer <= len(blocks):
        raise CheckpointError(f"exit layer {layer} is not one of the model's blocks 1..{len(blocks)}")
    stack = decoder_stack(model)
    name = next(n for n, child in stack.named_children() if child is blocks)
    setattr(stack, name, nn.ModuleList(list(blocks)[:layer]))
    try:
        yield model
    finally:
        setattr(stack, name, blocks)
