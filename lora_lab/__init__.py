"""lora_lab: search how to fine-tune with LoRA (rank, alpha, dropout, targets, LR) and compare with full fine-tuning."""

__version__ = "0.1.0"
