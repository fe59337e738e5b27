"""Exporting compressed models to other runtimes' file formats."""
