"""The conformance suite, shipped with the plugin so that a vendor can gate without a clone of this repository::

    pytest -p pytest_mnnvl --pyargs pytest_mnnvl.conformance --mnnvl-manager=mypkg.comm:MyManager

``test_invariants`` holds the tests; ``conftest`` loads their hooks and fixtures
(:mod:`pytest_mnnvl.conformance.plugin`). A clone's ``conformance/`` directory collects the same tests.
"""

from __future__ import annotations
