"""Training integration: offloaded gradient checkpointing (SFT and GRPO trainers come later)."""
