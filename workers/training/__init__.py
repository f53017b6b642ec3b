"""Recipes that are not part of serving (they need transformers): training the embedded default model."""
