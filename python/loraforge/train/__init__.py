"""Training integration: offloaded gradient checkpointing, SFT and GRPO through TRL, chunked log-probs."""
