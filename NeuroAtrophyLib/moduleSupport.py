"""Launching library jobs from Slicer and installing the modules' Python requirements."""

import os
import pathlib
import shutil

import slicer
from slicer.i18n import tr as _


def slicerPythonExecutable() -> str:
    """The ``PythonSlicer`` launcher, which runs Slicer's Python with Slicer's environment.

    Inside Slicer ``sys.executable`` is the application itself, which cannot run ``python -m``.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    candidate = pathlib.Path(slicer.app.slicerHome) / "bin" / name
    if candidate.is_file():
        return str(candidate)
    raise RuntimeError(_("The PythonSlicer executable was not found (looked on PATH and in {folder}).").format(
        folder=candidate.parent))


def childEnvironment() -> dict:
    """Environment for a ``PythonSlicer`` job: the one Slicer was started in (the launcher sets the paths)."""
    return slicer.util.startupEnvironment()


def isGiven(path) -> bool:
    """False for None, "" and pathlib.Path() (which a parameter node holds for an empty path)."""
    return path is not None and str(path) not in ("", ".")


def dependenciesInstalled(requirementsPath) -> bool:
    """True if every package of a requirements file is installed (checks metadata only)."""
    return not _missingRequirements(_readRequirements(requirementsPath))


def ensureDependencies(requirementsPath, requester: str) -> None:
    """Install the missing packages of a requirements file, after asking the user.

    Raises
    ------
    RuntimeError
        If the user declines the installation.
    """
    packaging = _slicerPackaging()
    if packaging is not None:
        # Slicer >= 5.12: asks, shows progress, offers a restart if an imported package changed.
        packaging.pip_ensure(packaging.load_requirements(str(requirementsPath)), requester=requester)
        return
    missing = _missingRequirements(_readRequirements(requirementsPath))
    if missing:
        _installWithConsent(missing, requester)


def _slicerPackaging():
    try:
        import slicer.packaging
    except ImportError:  # Slicer < 5.12
        return None
    return slicer.packaging if hasattr(slicer.packaging, "pip_ensure") else None


def _readRequirements(path) -> list:
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def _missingRequirements(requirements) -> list:
    """The requirements (``name>=version`` strings) that are not installed or too old."""
    import importlib.metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    missing = []
    for requirement in requirements:
        if Requirement is not None:
            parsed = Requirement(requirement)
            name, specifier = parsed.name, parsed.specifier
        else:
            name, specifier = requirement.split(">=")[0].strip(), None
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        if specifier is not None and not specifier.contains(version, prereleases=True):
            missing.append(requirement)
    return missing


def _installWithConsent(missing, requester: str) -> None:
    """Slicer < 5.12: ask, then install with ``slicer.util.pip_install`` behind a progress dialog."""
    question = _("{module} needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                 "Install them now? This may take a few minutes.").format(module=requester,
                                                                         packages="\n".join(missing))
    if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("Install Python packages")):
        raise RuntimeError(_("{module} cannot run without these Python packages: {packages}").format(
            module=requester, packages=", ".join(missing)))
    progress = slicer.util.createProgressDialog(labelText=_("Installing {packages}...").format(
        packages=", ".join(missing)), maximum=0)
    slicer.app.processEvents()
    try:
        slicer.util.pip_install(missing)
    finally:
        progress.close()
