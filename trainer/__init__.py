"""The training module: GRPO with the OISD, SDPG, RLSD and OPSD objectives (see METHODS.md)."""
