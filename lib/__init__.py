"""The science of the replication, one module per stage of the study.

In the order the study uses them: ``models`` (load a family's variants), ``data`` (prompt sets and splits),
``capture`` (residual-stream activations), ``directions`` (difference-in-means refusal directions), ``spectra``,
``ablation`` (directional ablation, weight orthogonalisation, activation addition), ``generation`` (batched greedy
decoding), ``scores`` (generation-free refusal scores), ``judges`` (refusal / valid / broken), ``layer_selection``,
``anatomy``, ``transfer``, ``training`` and ``organisms``, ``audit``, ``claims`` (every verdict rule) and ``viz``
(altair charts). Below them: ``stats`` and ``linalg`` (import nothing from lib), ``artifacts`` (paths, hashing,
cache keys, atomic safetensors files), ``config`` (the settings that travel together), ``runtime`` (device, dtype,
seed), ``batching``, ``progress`` and ``packed`` (an optional CPU speed-up). The book's machinery (runner, profiles,
lanes, suite, install) is the ``bookkit`` package, which imports lib, never the reverse.
"""

__version__ = "0.1.0"

import warnings as _warnings

# tqdm.auto (imported by dependencies) warns inside Jupyter when ipywidgets is absent; lib's own bars are plain tqdm.
_warnings.filterwarnings("ignore", message="IProgress not found")
