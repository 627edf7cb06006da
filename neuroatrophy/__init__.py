"""NeuroAtrophy: individual, actionable brain-atrophy analyses from MRI.

The Qt-free library behind the NeuroAtrophy 3D Slicer extension. It runs inside
Slicer, from Slicer's Python console, and headless through the ``neuroatrophy``
command.
"""

__version__ = "0.1.0"
