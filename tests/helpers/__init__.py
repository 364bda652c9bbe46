"""Shared test helpers.  Tests import shared constants from here, never from ``conftest``: under pytest a module
named ``conftest`` is whichever conftest.py was imported last (a plugin's own tests have one too)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository
