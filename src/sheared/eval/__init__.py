"""Evaluation: language-model loss and perplexity, generation, reference texts."""
