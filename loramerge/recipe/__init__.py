"""YAML recipes: the model of a recipe, its reader with line numbers, and running it (merge or fold)."""
