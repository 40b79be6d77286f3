"""The model in the loop: a resident base model with adapters swapped in memory, evaluation data and scores,
verification of merges and folds, and the activation statistics of data-aware methods.

transformers is imported only when a model is loaded (the ``eval`` extra).
"""
