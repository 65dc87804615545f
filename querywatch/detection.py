"""Deprecated: `querywatch.detection` was an import path in 0.1.0; it is internal now
(`querywatch._detection`). Import the public names from `querywatch` instead."""

from querywatch._moved import alias

__getattr__ = alias(__name__, "querywatch._detection")
