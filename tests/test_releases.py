"""Which FlashInfer release is installed: read from metadata, one list of supported releases."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pytest_mnnvl.backends import sim
from pytest_mnnvl.model import releases


def test_the_supported_releases_are_the_sims() -> None:
    assert releases.SUPPORTED == tuple(sim.RELEASES) == sim.SUPPORTED_FLASHINFER_VERSIONS


def test_the_installed_release_is_current() -> None:
    assert releases.current() == (releases.installed() or releases.DEFAULT)
    assert releases.resolve(None) == releases.current()
    assert releases.resolve(releases.V074) == releases.V074


def test_an_unsupported_release_names_the_supported_ones() -> None:
    with pytest.raises(releases.UnsupportedRelease) as info:
        releases.resolve("0.7.3")
    assert str(info.value) == (
        "FlashInfer '0.7.3' is not supported by pytest-mnnvl: supported releases are 0.7.2.post1, 0.7.4"
    )


def test_reading_the_release_imports_nothing_heavy() -> None:
    code = (
        "import sys; from pytest_mnnvl.model import releases; releases.current()\n"
        "print([m for m in ('torch', 'flashinfer') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
