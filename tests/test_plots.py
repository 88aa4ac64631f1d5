"""bnutils.plots: every figure is returned, drawn from the data given, and saved through save()."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bnutils import config, plots  # noqa: E402
from bnutils.stats import summarize  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def figures(tmp_path, monkeypatch):
    """Every figure of these tests lands in a temporary figures/ folder."""
    monkeypatch.setattr(config, "figures_dir", lambda: tmp_path)
    return tmp_path


def _run(name, seed, val_acc, loss=None):
    n = len(val_acc)
    return {
        "run_name": name,
        "seed": seed,
        "val_accuracy": val_acc,
        "train_loss": loss or [1.0 / (i + 1) for i in range(n)],
        "history": {},
        "epoch_times": [1.0] * n,
        "steps_per_epoch": 5,
    }


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_save_writes_name_png_into_the_figures_folder(figures, tmp_path):
    fig, _ = plt.subplots()
    assert plots.save(fig, "01_demo") == figures / "01_demo.png" and _is_png(
        figures / "01_demo.png"
    )
    assert plots.save(fig, "x", directory=tmp_path / "sub") == tmp_path / "sub" / "x.png"
    for bad in ("a/b", "a.png", ""):
        with pytest.raises(ValueError, match="file stem"):
            plots.save(fig, bad)
    plt.close(fig)


def test_learning_curves_show_the_seed_mean_and_band(figures):
    runs = {
        "BN": [_run("bn", 0, [0.5, 0.7, 0.8]), _run("bn", 1, [0.6, 0.8, 0.9])],
        "no BN": [_run("plain", 0, [0.4, 0.5, float("nan")])],
    }  # diverged in epoch 3
    fig = plots.plot_learning_curves(runs, metrics=["val_accuracy", "train_loss"], name="curves")
    assert isinstance(fig, Figure) and _is_png(figures / "curves.png")
    assert not plt.fignum_exists(fig.number), "closed in pyplot, so shown once"
    ax = fig.axes[0]
    bn_line = ax.lines[0]
    np.testing.assert_allclose(bn_line.get_ydata(), [0.55, 0.75, 0.85])
    np.testing.assert_allclose(bn_line.get_xdata(), [1, 2, 3])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1, "a band only for the configuration with several seeds"
    assert "BN (n=2)" in [t.get_text() for t in ax.get_legend().get_texts()]
    flat = plots.plot_learning_curves(
        [_run("a", 0, [0.1, 0.2]), _run("b", 0, [0.3, 0.4])], metrics="val_accuracy"
    )
    assert len(flat.axes[0].lines) == 2
    with pytest.raises(ValueError, match="no curve 'val_top5'"):
        plots.plot_learning_curves(runs, metrics="val_top5")


def test_learning_curves_take_keras_history():
    import keras

    x, y = np.zeros((8, 2), "float32"), np.zeros(8, "int64")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]
    )
    history = model.fit(x, y, validation_data=(x, y), epochs=3, verbose=0)
    fig = plots.plot_learning_curves({"fit": history})  # train_loss is Keras's "loss"
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), history.history["val_accuracy"])
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), history.history["loss"])


def test_percentile_figure_side_by_side(figures):
    rec = {
        "steps": [0, 50, 100],
        "values": [[-1, 0, 1], [-2, 0, 2], [-3, 0, 3]],
        "percentiles": [15, 50, 85],
    }
    fig = plots.plot_percentiles({"without BN": rec, "with BN": rec}, name="p")
    assert _is_png(figures / "p.png") and len(fig.axes) == 2
    assert [a.get_title() for a in fig.axes] == ["without BN", "with BN"]
    assert len(fig.axes[1].lines) == 3
    np.testing.assert_allclose(fig.axes[0].lines[2].get_ydata(), [1, 2, 3])
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])


def test_comparison_bars_carry_the_confidence_interval(figures):
    groups = {"BN": [0.88, 0.89, 0.90], "no BN": [0.85, 0.87, 0.86]}
    fig = plots.plot_comparison(groups, name="bars")
    assert _is_png(figures / "bars.png")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.89, 0.86])
    segments = [c for c in ax.collections if hasattr(c, "get_segments") and c.get_segments()]
    spans = sorted(abs(s[1][1] - s[0][1]) for c in segments for s in c.get_segments())
    want = sorted(2 * summarize(v).half_width for v in groups.values())
    np.testing.assert_allclose(spans, want, rtol=1e-6)
    fig2 = plots.plot_comparison({k: summarize(v) for k, v in groups.items()})
    assert len(fig2.axes[0].patches) == 2


def test_confusion_matrix_figure(figures):
    y_true, y_pred = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2]
    fig = plots.plot_confusion_matrix(y_true, y_pred, class_names=["a", "b", "c"], name="cm")
    assert _is_png(figures / "cm.png")
    shown = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, [[0.5, 0.5, 0], [0, 1, 0], [1 / 3, 0, 2 / 3]])
    counts = plots.plot_confusion_matrix(np.array([[3, 1], [0, 4]]), normalize=False)
    assert "4" in [t.get_text() for t in counts.axes[0].texts]
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix(np.zeros((2, 3)))


def test_tracker_figures(figures):
    stats = {"steps": [0, 10], "stats": {"bn1": {"mean": [0.0, 0.2], "variance": [1.0, 2.0]}}}
    fig = plots.plot_moving_stats(stats, name="ms")
    assert _is_png(figures / "ms.png")
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), [1.0, 2.0])
