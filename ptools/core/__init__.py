"""The ptools library: plain functions and dataclasses, no terminal, no printing.

Import the submodule you need (``ptools.core.gpu``, …); heavy dependencies such as torch
are imported inside the functions that need them.
"""
