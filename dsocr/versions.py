"""The package versions this code is tested with, checked when a model loads.

The trainer overrides private ``transformers.Trainer`` methods (atomic checkpoints, the signal stop, the
end-of-training sweep, adapter loading on resume) and the adapter loader reads PEFT internals
(``dsocr/adapters.py``). Private APIs change without notice, so transformers and PEFT are held to the exact
versions in ``requirements.txt``, not to a minimum; a test keeps the two lists equal. torch only needs to
be new enough (a CUDA build of another version is the normal case on a GPU machine).

``DSOCR_ALLOW_UNTESTED=1`` turns the refusal into a warning, for trying a newer release on purpose.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Exact versions: their private APIs are used (see the module docstring).
TESTED_VERSIONS = {
    "transformers": "5.17.0",
    "peft": "0.21.2",
}
# Lower bounds only.
MIN_VERSIONS = {
    "torch": "2.6.0",  # torch._grouped_mm for the grouped experts; SDPA with enable_gqa
}
ALLOW_UNTESTED_ENV = "DSOCR_ALLOW_UNTESTED"


def version_problems() -> list[str]:
    """Every installed version that differs from ``TESTED_VERSIONS`` or is below ``MIN_VERSIONS``."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    problems = []
    for name, want in {**TESTED_VERSIONS, **MIN_VERSIONS}.items():
        try:
            have = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed (need {want})")
            continue
        have_v = Version(have.split("+")[0])
        if name in TESTED_VERSIONS and have_v != Version(want):
            problems.append(f"{name} {have} is not the tested {want}")
        elif name in MIN_VERSIONS and have_v < Version(want):
            problems.append(f"{name} {have} < {want}")
    return problems


def check_versions() -> None:
    """Refuse untested transformers/PEFT versions and too old a torch, naming each and the fix."""
    problems = version_problems()
    if not problems:
        return
    message = "; ".join(problems) + ". To fix: pip install -r requirements.txt"
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        log.warning("%s (continuing: %s=1)", message, ALLOW_UNTESTED_ENV)
        return
    raise RuntimeError(f"{message} (or set {ALLOW_UNTESTED_ENV}=1 to try these versions anyway)")
