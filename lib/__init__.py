"""Stage-per-module toolkit for the refusal-direction replication book.

Modules, in the order the study uses them: ``models`` (load a family's variants), ``data`` (prompt sets and
splits), ``capture`` (residual-stream activations), ``directions`` (difference-in-means refusal directions),
``ablation`` (directional ablation, weight orthogonalisation, activation addition), ``generation`` (batched greedy
decoding), ``judges`` (refusal / valid / broken), ``viz`` (altair charts), ``artifacts`` (paths, hashing, atomic
safetensors files). ``runtime`` holds device, dtype, seed and progress-bar helpers shared by all of them.
"""

__version__ = "0.1.0"

import warnings as _warnings

# tqdm.auto (imported by dependencies) warns inside Jupyter when ipywidgets is absent; lib's own bars are plain tqdm.
_warnings.filterwarnings("ignore", message="IProgress not found")
