"""Import MONAI without the optional libraries that no meddiff command uses (issue 15, start-up).

``import monai`` imports nearly every MONAI subpackage (``monai.utils.module.load_submodules``), and with them,
where they are installed, matplotlib (``monai.utils.jupyter_utils``), pandas (``monai.utils.profiling``),
scikit-learn (``monai.metrics.embedding_collapse``) and ``scipy.signal``
(``monai.data.ultrasound_confidence_map``): with them hidden, ``import monai.networks.nets`` took 2.32 s
instead of 3.43 s on a 2-core Xeon (``benchmarks/bench_startup.py``, torch included;
results/startup_amx_xeon_2026-12-03.json). scikit-image and
``scipy.optimize`` stay visible: hiding them too gained little in a quick check, not worth hiding MONAI's label
post-processing. MONAI imports each of them through ``optional_import`` or a
``try/except ImportError``, so while they are hidden (``None`` in ``sys.modules``, Python's own "not importable"
mark) it records them as missing and goes on. They are visible again as soon as MONAI is in: code that imports
them itself gets them as usual; only those few MONAI helpers (plotting, profiling tables, embedding-collapse
metrics, ultrasound confidence maps: none used by these commands; bundle transforms are never instantiated)
would report them missing in that process.

Only the ``meddiff`` commands that run models call `import_monai_lean` (their own process); the napari plugin
and the library never do. ``MEDDIFF_LEAN_IMPORTS=0`` turns it off. If a MONAI version ever needs one of them,
the import is redone in full.
"""

from __future__ import annotations

import os
import sys

HIDDEN_WHILE_IMPORTING_MONAI = ("matplotlib", "pandas", "sklearn", "scipy.signal")
LEAN_ENV = "MEDDIFF_LEAN_IMPORTS"


def import_monai_lean() -> bool:
    """Import ``monai`` with `HIDDEN_WHILE_IMPORTING_MONAI` hidden; True if it was imported that way.

    Does nothing (False) when MONAI is already imported or ``MEDDIFF_LEAN_IMPORTS=0``."""
    if "monai" in sys.modules or os.environ.get(LEAN_ENV, "1").strip() == "0":
        return False
    hidden = [name for name in HIDDEN_WHILE_IMPORTING_MONAI if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # "import name" now raises ImportError
    try:
        import monai  # noqa: F401

        return True
    except ImportError:  # a MONAI that needs one of them: forget the partial import, import it whole below
        for name in [m for m in sys.modules if m == "monai" or m.startswith("monai.")]:
            del sys.modules[name]
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    import monai  # noqa: F401, F811

    return False
