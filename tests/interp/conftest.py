"""Tests of the Triton kernels run by Triton's CPU interpreter.

They need ``TRITON_INTERPRET=1`` before triton is first imported, which a normal test session
cannot promise (torch imports triton lazily), so the main session does not collect them:
``tests/test_triton_kernels.py`` runs ``pytest tests/interp`` in a subprocess with the variable set.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
else:
    pytest.importorskip("triton")
