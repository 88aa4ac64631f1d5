"""bnutils: batch normalization in Keras 3 / TensorFlow, measured.

Importing ``bnutils`` is cheap and has no side effects: every name below is loaded from
its module on first use (so ``import bnutils`` does not import TensorFlow).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # config / repro / data
    "Profile": "config",
    "PROFILES": "config",
    "get_profile": "config",
    "results_dir": "config",
    "figures_dir": "config",
    "set_seed": "repro",
    "Dataset": "data",
    "DatasetError": "data",
    "load_dataset": "data",
    "make_tf_dataset": "pipeline",
    # models and BN layers
    "build_mlp": "models",
    "build_cnn": "models",
    "build_resnet": "models",
    "insert_batchnorm": "insertion",
    "InsertionReport": "insertion",
    "ScratchBatchNormalization": "scratch",
    "FusedBatchNormalization": "layers",
    "GhostBatchNormalization": "layers",
    "convert_batchnorm": "layers",
    # training and evaluation
    "train": "training",
    "TrainResult": "training",
    "load_result": "training",
    "Tracker": "callbacks",
    "ActivationPercentiles": "callbacks",
    "MovingStatsTracker": "callbacks",
    "GradientNormTracker": "callbacks",
    "NoisyBatchNormalization": "noisy",
    "evaluate": "evaluation",
    "summarize": "evaluation",
    "paired_comparison": "evaluation",
    "confusion_matrix": "evaluation",
    "time_to_accuracy": "evaluation",
    "make_table": "evaluation",
    "plot_learning_curves": "plots",
    "plot_percentiles": "plots",
    "plot_comparison": "plots",
    "plot_confusion_matrix": "plots",
    "plot_moving_stats": "plots",
    "plot_gradient_norms": "plots",
    # tuning
    "run_sweep": "tuning",
    "SweepResult": "tuning",
    "load_sweep": "tuning",
    "usable_range": "tuning",
    "keras_tuner_search": "tuning",
    # precise BN and the BN doctor
    "recalibrate_batchnorm": "precise",
    "RecalibrationReport": "precise",
    "find_batchnorm_layers": "precise",
    "diagnose_batchnorm": "doctor",
    "DoctorReport": "doctor",
    "Finding": "doctor",
    # inference
    "fold_batchnorm": "folding",
    "export_savedmodel": "export",
    "load_for_inference": "export",
    "check_batch_independence": "inference",
    "BatchIndependenceReport": "inference",
    "FoldReport": "folding",
    "check_fresh_process": "export",
    "export_onnx": "runtimes",
    "export_litert": "runtimes",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bnutils' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"bnutils.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
