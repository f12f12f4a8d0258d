"""The low-rank core of lorakit.

* :func:`factorize`: approximate a matrix by ``A @ B`` with gradient descent (the seed example),
  compared with the Eckart-Young optimum of the truncated SVD.
* :func:`inspect_adapter` / :func:`compare_adapters`: singular-value spectra, effective ranks and
  subspace similarity (LoRA paper, section 7) of saved adapters.
"""

from lorakit.lowrank.adapter_files import Adapter, AdapterReadError, LayerUpdate, read_adapter
from lorakit.lowrank.analysis import (
    AdapterReport,
    ComparisonReport,
    LayerComparison,
    LayerReport,
    compare_adapters,
    compare_layers,
    inspect_adapter,
    layer_spectrum,
    update_directions,
)
from lorakit.lowrank.factorize import (
    SEED_EXAMPLE_MATRIX,
    SEED_EXAMPLE_SETTINGS,
    FactorizationDivergedError,
    FactorizationError,
    FactorizationResult,
    factorize,
)
from lorakit.lowrank.matrix_io import load_matrix
from lorakit.lowrank.spectrum import (
    SpectrumStats,
    energy_rank,
    factored_svd,
    numerical_rank,
    singular_values,
    spectrum_stats,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
    svd_optimum_loss,
)

__all__ = [
    "SEED_EXAMPLE_MATRIX",
    "SEED_EXAMPLE_SETTINGS",
    "Adapter",
    "AdapterReadError",
    "AdapterReport",
    "ComparisonReport",
    "FactorizationDivergedError",
    "FactorizationError",
    "FactorizationResult",
    "LayerComparison",
    "LayerReport",
    "LayerUpdate",
    "SpectrumStats",
    "compare_adapters",
    "compare_layers",
    "energy_rank",
    "factored_svd",
    "factorize",
    "inspect_adapter",
    "layer_spectrum",
    "load_matrix",
    "numerical_rank",
    "read_adapter",
    "singular_values",
    "spectrum_stats",
    "stable_rank",
    "subspace_similarity",
    "subspace_similarity_grid",
    "svd_optimum_loss",
    "update_directions",
]
