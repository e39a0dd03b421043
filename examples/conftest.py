"""Lets the demo's rank functions be imported by name in every rank."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
