"""pysparse: model and dataset compression for PyTorch.

Fused C++/CUDA kernels for saliency scoring, mask selection and masking (:mod:`pysparse.ops`), each with a
plain-PyTorch twin in :mod:`pysparse.reference`.
"""
from ._extension import cuda_built, cuda_usable
from . import csr, nn, ops, reference
from . import data, gan, models, synth
from .convert import densify, sparsify
from .fold import fold_batchnorm
from .io import load, save
from .prune import PruneResult, from_torch_prune, prune, to_torch_prune
from .sensitivity import SensitivityResult, plot_report, sensitivity
from .schedule import GradualPruner, cubic_sparsity, iterative_prune, iterative_sparsities
from .retrain import RetrainResult, accuracy, remember_init, retrain, train
from .nn import SparseConv2d, SparseLinear, SparseMultiheadAttention
from .ops import apply_mask_, nm_masks, saliency, sparsity_masks, threshold_masks

__version__ = "0.1.0"

__all__ = [
    "ops", "reference", "csr", "nn", "data", "models", "gan", "synth",
    "sparsify", "densify", "fold_batchnorm", "save", "load", "SparseLinear", "SparseConv2d", "SparseMultiheadAttention",
    "prune", "PruneResult", "to_torch_prune", "from_torch_prune",
    "GradualPruner", "cubic_sparsity", "iterative_prune", "iterative_sparsities",
    "sensitivity", "SensitivityResult", "plot_report",
    "retrain", "RetrainResult", "remember_init", "train", "accuracy",
    "saliency", "sparsity_masks", "threshold_masks", "nm_masks", "apply_mask_",
    "cuda_built", "cuda_usable", "__version__",
]
