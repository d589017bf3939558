"""One folder per DSA op: ``triton.py`` (the kernels and their launchers) beside ``reference.py``
(the plain-torch twin the tests compare against, re-exported from ``dsv.core.attention`` where core
already has it)."""
