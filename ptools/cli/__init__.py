"""The ``ptools`` command line: one module per command over :mod:`ptools.core`."""
