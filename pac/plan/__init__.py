"""Planning: which peer runs which layers and trains which samples (pure functions)."""
