"""kdserve's version, in a module of its own: the package root exports it, and what records
it (a store's manifest, an online teacher's info) imports it without importing the root."""

__version__ = "0.1.0"
