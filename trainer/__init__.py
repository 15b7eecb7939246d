"""The training module: GRPO with the OISD, SDPG, RLSD and OPSD objectives (docs/objectives.md)."""
