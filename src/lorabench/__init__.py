"""lorabench: compare LoRA variants (LoRA, QLoRA, QA-LoRA, ReLoRA) and full fine-tuning on one shared backbone."""

__version__ = "0.1.0"
