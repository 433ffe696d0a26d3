"""Test-suite settings shared by every folder."""

from __future__ import annotations

import os

from hypothesis import settings

# CI (CI=true, as .ci/run is started) runs every property test on the same examples, so a landing
# never depends on the luck of a random draw; developers' runs draw new examples each time.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
