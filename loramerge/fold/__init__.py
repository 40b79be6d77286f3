"""The fold layer: adding adapters' updates into a base model's weights, streamed shard by shard."""
