"""langmerge: one LoRA expert per language, merged into one model, with the cost measured."""

from langmerge.errors import LangmergeError

__version__ = "0.1.0"
__all__ = ["LangmergeError", "__version__"]
