"""Import ssmc from this checkout without installing it (the device machines have no `pip install -e .`):
pyproject maps ssmc.passes -> passes/, ssmc.targets -> targets/, ssmc.grammar -> grammar/, so a fallback finder
(appended last to sys.meta_path) resolves those three; an installed (editable) ssmc is found first and wins.
Import this module first: `import _tree  # noqa: F401` from a script in bench/."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


class SsmcTreeFinder:
    MAP = {"ssmc.passes": "passes", "ssmc.targets": "targets", "ssmc.grammar": "grammar"}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.MAP.get(fullname)
        if folder is None:
            return None
        init = ROOT / folder / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not any(type(f).__name__ == "SsmcTreeFinder" for f in sys.meta_path):
    sys.meta_path.append(SsmcTreeFinder())
