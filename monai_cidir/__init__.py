"""monai_cidir: cIDIR deformable lung CT registration as MONAI components.

Sub-packages mirror MONAI: ``networks``, ``losses``, ``transforms``, ``data``,
``engines``, ``metrics``, ``handlers``; ``coordinates`` owns every mapping between
array index, world millimetres and the network's normalised coordinates.
"""

from __future__ import annotations

__version__ = "0.1.0"
