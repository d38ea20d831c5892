"""Fetching Debian packages (the only stateful part of the corpus, besides writing the output).

Packages are fetched with `apt-get download` and unpacked with `dpkg -x` into a cache folder
(never installed). Where apt is missing or a download fails, the source that needed the package is
skipped with a one-line reason (`_SourceUnavailable`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

APT_DOWNLOAD_TIMEOUT_S = 1800  # texlive-publishers-doc alone is 213 MB
APT_UPDATE_TIMEOUT_S = 600
DPKG_TIMEOUT_S = 600


class _SourceUnavailable(Exception):
    """A source cannot be read on this machine; the message is the one-line reason."""


def _last_line(output: str) -> str:
    """The most telling line of a failed command's output: its last error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["(no output)"])[-1]


def _run(command: Sequence[str], *, cwd: Path | None = None, timeout: float) -> str | None:
    """Runs a command with English messages; returns None on success, else a one-line reason."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        result = subprocess.run(
            list(command),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"`{' '.join(command[:2])}` timed out after {timeout:.0f} s"
    except OSError as error:
        return f"`{command[0]}` could not run: {error}"
    if result.returncode != 0:
        return f"`{' '.join(command[:2])}` failed: {_last_line(result.stderr + result.stdout)}"
    return None


class _DebianPackages:
    """Downloads (`apt-get download`) and unpacks (`dpkg -x`) Debian packages into a cache.

    Layout: `<cache>/debs/<pkg>_<version>_<arch>.deb` and `<cache>/trees/<pkg>/` (the unpacked
    package). Both are moved into place only when complete, so an interrupted run leaves nothing
    that looks finished. Failures are remembered for the rest of the build, so a package two
    sources need is tried once.
    """

    def __init__(self, cache_dir: Path) -> None:
        self._debs = cache_dir / "debs"
        self._trees = cache_dir / "trees"
        self._update_tried = False
        self._failures: dict[str, str] = {}

    def remove_unpacked(self) -> int:
        """Delete the unpacked packages (the `.deb` files stay, so a rebuild needs no network); bytes freed."""
        if not self._trees.is_dir():
            return 0
        freed = sum(f.stat().st_size for f in self._trees.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(self._trees)
        return freed

    def tree(self, package: str) -> Path:
        """Returns the folder the package is unpacked in, fetching it first if needed.

        Raises:
            _SourceUnavailable: If apt/dpkg are missing or the download or unpacking fails.
        """
        tree = self._trees / package
        if tree.is_dir():
            return tree
        if package in self._failures:
            raise _SourceUnavailable(self._failures[package])
        try:
            deb = self._deb(package)
            self._unpack(deb, tree)
        except _SourceUnavailable as error:
            self._failures[package] = str(error)
            raise
        return tree

    def _deb(self, package: str) -> Path:
        found = sorted(self._debs.glob(f"{package}_*.deb"))
        if found:
            return found[-1]
        if shutil.which("apt-get") is None:
            raise _SourceUnavailable("apt-get not found (needs a Debian-based system)")
        staging = self._debs / f".download-{package}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            problem = self._download(package, staging)
            if problem and not self._update_tried:
                # The package lists may be missing or stale (fresh containers ship without them).
                self._update_tried = True
                logger.info("apt-get download %s failed (%s); running apt-get update once", package, problem)
                update_problem = _run(["apt-get", "update"], timeout=APT_UPDATE_TIMEOUT_S)
                if update_problem:
                    raise _SourceUnavailable(f"{problem}; {update_problem}")
                problem = self._download(package, staging)
                if problem:
                    problem += " (after apt-get update)"
            if problem:
                raise _SourceUnavailable(problem)
            downloaded = sorted(staging.glob(f"{package}_*.deb"))
            if not downloaded:
                raise _SourceUnavailable("apt-get download produced no .deb file")
            deb = self._debs / downloaded[-1].name
            os.replace(downloaded[-1], deb)
            return deb
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _download(package: str, staging: Path) -> str | None:
        logger.info("apt-get download %s", package)
        return _run(["apt-get", "download", package], cwd=staging, timeout=APT_DOWNLOAD_TIMEOUT_S)

    @staticmethod
    def _unpack(deb: Path, tree: Path) -> None:
        if shutil.which("dpkg") is None:
            raise _SourceUnavailable("dpkg not found (needs a Debian-based system)")
        staging = tree.with_name(f".{tree.name}.unpacking")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        logger.info("dpkg -x %s", deb.name)
        problem = _run(["dpkg", "-x", str(deb), str(staging)], timeout=DPKG_TIMEOUT_S)
        if problem:
            shutil.rmtree(staging, ignore_errors=True)
            raise _SourceUnavailable(problem)
        os.replace(staging, tree)
