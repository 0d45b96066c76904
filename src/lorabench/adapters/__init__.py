"""Adapter layers shared by strategies (LoRA today; pooled variants live beside it)."""
