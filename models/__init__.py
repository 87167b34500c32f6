"""codec.models: the architecture zoo (`build_model`) and the named benchmark recipes (`get_recipe`)."""

from codec.models.recipes import (
    RECIPES,
    TASKS,
    TRAIN_KEYS,
    FrozenDict,
    Recipe,
    get_recipe,
    list_recipes,
)
from codec.models.zoo import ARCHITECTURES, architecture_options, autoencoder_widths, build_model

__all__ = [
    "ARCHITECTURES",
    "RECIPES",
    "TASKS",
    "TRAIN_KEYS",
    "FrozenDict",
    "Recipe",
    "architecture_options",
    "autoencoder_widths",
    "build_model",
    "get_recipe",
    "list_recipes",
]
