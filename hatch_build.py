"""Build hook: compile ``digest._speedups`` (src/digest/_speedups.c), the send path's per-reader
work in C.

The extension is optional. Where it cannot be built (no C compiler, no Python headers), the
build says so and goes on, and digest runs its pure-Python path, which writes the same bytes
more slowly (tests/delivery/test_speedups.py compares the two). An editable install
(``pip install -e .``) puts the module next to its source in src/digest; a wheel carries it.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src/digest/_speedups.c")


def compile_speedups(root: Path, out_dir: Path) -> Path:
    """Compile the extension into ``out_dir``; the path of the built module."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    ext = Extension("digest._speedups", [str(root / SOURCE)], extra_compile_args=["-O3"])
    dist = Distribution({"name": "digest", "ext_modules": [ext]})
    cmd = build_ext(dist)
    cmd.build_lib = str(out_dir)
    cmd.build_temp = str(out_dir / "temp")
    cmd.ensure_finalized()
    cmd.run()
    return Path(cmd.get_ext_fullpath("digest._speedups"))


class SpeedupsHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("DIGEST_NO_SPEEDUPS"):
            return
        root = Path(self.root)
        self._work = Path(tempfile.mkdtemp(prefix="digest-speedups-"))
        try:
            built = compile_speedups(root, self._work)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the pure-Python path
            self.app.display_warning(f"digest: the C speedups were not built ({exc}); "
                                     "sending uses the pure-Python path")
            return
        name = "_speedups" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        if version == "editable":  # the package is imported from src/digest
            shutil.copy2(built, root / "src" / "digest" / name)
        else:
            build_data["force_include"][str(built)] = f"digest/{name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        work = getattr(self, "_work", None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
