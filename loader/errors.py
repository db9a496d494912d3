"""The one error a model load raises."""
from __future__ import annotations


class ModelLoadError(Exception):
    """A base model could not be loaded; the message names the file and the problem."""
