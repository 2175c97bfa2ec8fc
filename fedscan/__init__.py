"""fedscan: federated brain-MRI and lung-CT classification across hospitals, on Flower.

One import package. The installed wheel holds ``fedscan.common`` (framework-free
core), ``fedscan.client`` / ``fedscan.server`` (Flower glue), ``fedscan.simulations``
(CLI and experiment drivers), ``fedscan.deploy`` and ``fedscan.configs``; in the
repository they are the top-level folders ``common/``, ``client/``, ``server/``,
``simulations/``, ``deploy/`` and ``configs/`` (setuptools' ``package-dir`` mapping,
``pyproject.toml``).

In a source tree that is not installed as a wheel (a checkout on ``PYTHONPATH``, a
git worktree, or the app folder ``flwr run .`` ships to the SuperLink), the
sub-packages are those sibling folders: the package's search path then also holds
the folder above this one, so ``fedscan.common`` is ``<checkout>/common``. An
installed wheel has its sub-packages inside ``fedscan/`` and never looks beside it.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.2.0"

_here = Path(__file__).resolve().parent
_checkout = _here.parent
if (
    not (_here / "common").is_dir()
    and (_checkout / "common" / "__init__.py").is_file()
    and (_checkout / "pyproject.toml").is_file()
):
    __path__.append(str(_checkout))

del Path, _here, _checkout
