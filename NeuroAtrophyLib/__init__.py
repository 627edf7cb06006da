"""Slicer-side helpers shared by the NeuroAtrophy modules.

Unlike the Qt-free ``neuroatrophy`` library, this package may use Slicer's application
(dialogs, the ``PythonSlicer`` launcher, package installation). It holds what every
NeuroAtrophy module needs in the same form, so that the modules stay thin.
"""

from .moduleSupport import childEnvironment, dependenciesInstalled, ensureDependencies, isGiven, slicerPythonExecutable

__all__ = ["childEnvironment", "dependenciesInstalled", "ensureDependencies", "isGiven", "slicerPythonExecutable"]
