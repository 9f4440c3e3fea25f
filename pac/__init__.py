"""pac: personal LLM fine-tuning with Parallel Adapters trained from an activation cache."""

__version__ = "0.1.0"
