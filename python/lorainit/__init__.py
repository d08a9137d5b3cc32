"""lorainit: data-aware LoRA initialization for PEFT models, transformers' Trainer and plain loops."""
__version__ = "0.1.0"
