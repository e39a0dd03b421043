"""pytest-mnnvl: a pytest plugin and conformance harness for MoE all-to-all workspace managers.

Loading the plugin (``pytest -p pytest_mnnvl``) must stay cheap: nothing here imports torch,
FlashInfer or Hypothesis. The hooks live in :mod:`pytest_mnnvl.plugin`.
"""

from __future__ import annotations

__version__ = "0.1.0"

# `-p pytest_mnnvl` imports this package; pytest then loads the hook module named here.
pytest_plugins = ["pytest_mnnvl.plugin"]
