"""Method registry: a name → a :class:`~hf_ptq.methods.base.PTQMethod` subclass.

Adding a method is one new file in this package that decorates its class with
``@register_method("name")`` and is imported below.
"""

from __future__ import annotations

from .base import PTQMethod, available_methods, get_method, register_method

# Importing the modules registers the methods.
from . import rtn  # noqa: E402,F401
from . import brecq  # noqa: E402,F401
from . import comq  # noqa: E402,F401
from . import fpxint  # noqa: E402,F401

__all__ = ["PTQMethod", "available_methods", "get_method", "register_method"]
