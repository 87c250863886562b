"""Is a synthetic cohort any good, and is it private? `audit` measures memorization (each synthetic volume's
nearest training volume, against a threshold set by real subjects), diversity (MS-SSIM) and fidelity
(two-sample tests), and writes ``audit.json`` and ``report.html``.

Modules: ``grid`` (every volume on one world grid), ``memorization``, ``diversity``, ``fidelity``,
``report``; ``pipeline`` runs them. Importing this package is cheap: torch and MONAI load when an audit runs.
"""

from __future__ import annotations

import sys
import types

from napari_meddiff.audit.pipeline import AuditResult, audit


class _CallableModule(types.ModuleType):
    """``napari_meddiff.audit`` is this package and, once imported, also the package's attribute of the same
    name: calling it runs `audit`, so ``md.audit(...)`` works whichever of the two it finds."""

    def __call__(self, *args, **kwargs) -> AuditResult:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["AuditResult", "audit"]
