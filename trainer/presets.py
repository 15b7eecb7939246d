"""Model presets of the embedded default: tiny Qwen3-architecture models.

``tiny`` has a few hundred thousand parameters (a laptop CPU trains it in minutes);
``small`` a few million. Both use grouped-query attention and QK-norm like Qwen3, so
the code paths exercised here are those of real Qwen3 checkpoints.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=96, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
    ),
    "small": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32,
    ),
}


def preset_config(name: str, tokenizer, max_position_embeddings: int = 512):
    """A ``Qwen3Config`` for preset ``name`` sized to ``tokenizer``'s vocabulary."""
    from transformers import Qwen3Config

    from workbench.errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    return Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,  # tied: at this size the embedding is a large share of the parameters
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[name],
    )
