"""The merge layer: aligning sources (plan), per-module overrides, the engine, and the method registry."""
