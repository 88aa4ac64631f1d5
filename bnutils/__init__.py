"""bnutils: batch normalization in Keras 3 / TensorFlow, measured.

The notebooks show each idea in plain Keras first; this package holds what Keras does not do
(inserting and folding BN, precise BN, the BN doctor, statistics over seeds) and the plumbing
every notebook shares. Importing it imports Keras and its submodules, and nothing runs on import.

One convention for what a function does to your model:

- a function that builds a model from yours (``insert_batchnorm``, ``fold_batchnorm``,
  ``convert_batchnorm``) returns a new model and leaves yours as it was; with
  ``return_report=True`` it returns ``(model, report)``, and it warns when it changed nothing;
- a function that only updates weights (``recalibrate_batchnorm``) works in place, as ``fit``
  does, and returns its report, as ``fit`` returns its History; it raises when there is nothing
  to update;
- every report is a :class:`bnutils.results.Report` (a table as ``str()``, JSON as
  ``to_dict()``); a model that cannot be rewritten (subclassed) raises ``TypeError``, a bad
  argument ``ValueError``, each message saying what was received and what was expected.
"""

__version__ = "0.3.0"

from bnutils import (  # submodules are attributes: `bnutils.config` just works
    cache,
    callbacks,
    config,
    data,
    distributed,
    doctor,
    evaluation,
    export,
    folding,
    inference,
    insertion,
    layers,
    models,
    plots,
    precise,
    repro,
    results,
    scratch,
    stats,
    sweeps,
    training,
    tuner,
)
from bnutils._graph import find_batchnorm_layers, walk_layers
from bnutils.callbacks import (
    AccuracyTracker,
    ActivationPercentiles,
    MovingStatsTracker,
    Tracker,
)
from bnutils.config import PROFILES, Profile, figures_dir, get_profile, results_dir
from bnutils.data import Dataset, DatasetError, load_dataset, make_tf_dataset
from bnutils.doctor import DoctorReport, Finding, diagnose_batchnorm
from bnutils.evaluation import confusion_matrix, evaluate, time_to_accuracy
from bnutils.export import (
    check_fresh_process,
    export_litert,
    export_onnx,
    export_savedmodel,
    load_for_inference,
)
from bnutils.folding import FoldReport, fold_batchnorm
from bnutils.inference import BatchIndependenceReport, check_batch_independence
from bnutils.insertion import InsertionReport, insert_batchnorm
from bnutils.layers import (
    ConversionReport,
    FusedBatchNormalization,
    GhostBatchNormalization,
    NoisyBatchNormalization,
    convert_batchnorm,
)
from bnutils.models import build_cnn, build_mlp, build_resnet
from bnutils.plots import (
    plot_comparison,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_moving_stats,
    plot_percentiles,
)
from bnutils.precise import RecalibrationReport, recalibrate_batchnorm
from bnutils.repro import set_seed
from bnutils.results import Table, make_table, read_result, write_result
from bnutils.scratch import ScratchBatchNormalization
from bnutils.stats import paired_comparison, summarize
from bnutils.sweeps import SweepResult, load_sweep, run_sweep, usable_range
from bnutils.training import TrainResult, load_result, train
from bnutils.tuner import keras_tuner_search

# The public names: the submodules and every name imported above from them.
__all__ = sorted(name for name in globals() if not name.startswith("_")) + ["__version__"]
