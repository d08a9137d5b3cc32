"""Integrations with trainers (transformers Trainer) and distributed runs."""
