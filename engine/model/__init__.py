"""What a checkpoint is: the transformer definition and its config, checkpoint and hub loading, LoRA, weight formats."""
