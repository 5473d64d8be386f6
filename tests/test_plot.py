"""``loopkit.plot`` and ``python -m loopkit plot``: curves drawn from CSVLogger runs."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from loopkit.__main__ import main
from loopkit.loggers import CSVLogger
from loopkit.plot import find_runs, plot_runs, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_runs(root) -> list[CSVLogger]:
    """Two runs of one experiment: train/loss every 5 steps, val/acc every 10, a metric only run 1 has."""
    runs = [CSVLogger(root, "exp") for _ in range(2)]
    for i, run in enumerate(runs):
        for step in range(5, 45, 5):
            run.log_metrics({"train/loss": (1.0 + i) / step}, step)
            if step % 10 == 0:
                run.log_metrics({"val/acc": 1.0 - (1.0 + i) / step}, step)
        if i == 1:
            run.log_metrics({"lr-SGD": 0.1}, 40)
    return runs


def assert_png(path, min_bytes=10_000):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 100
    assert len(data) > min_bytes  # curves, ticks and labels, not an empty canvas
    return width, height


def test_each_metric_gets_a_subplot_with_every_runs_curve(tmp_path):
    runs = write_runs(tmp_path)
    out = tmp_path / "curves.png"
    fig = plot_runs([run.log_dir for run in runs], out)
    assert_png(out)
    assert [ax.get_title() for ax in fig.axes] == ["train/loss", "val/acc", "lr-SGD"]
    for ax in fig.axes:
        name = ax.get_title()
        lines = {line.get_label(): line for line in ax.get_lines()}
        having = [run for run in runs if name in read_metrics(run.log_dir)]
        assert sorted(lines) == [os.path.join("exp", os.path.basename(run.log_dir)) for run in having]
        for run in having:  # the drawn points are the logged ones, checked against what was logged
            line = lines[os.path.join("exp", os.path.basename(run.log_dir))]
            i = runs.index(run)
            expected = {
                "train/loss": [(s, (1.0 + i) / s) for s in range(5, 45, 5)],
                "val/acc": [(s, 1.0 - (1.0 + i) / s) for s in range(10, 45, 10)],
                "lr-SGD": [(40, 0.1)],
            }[name]
            assert list(zip(line.get_xdata(), line.get_ydata())) == expected


def test_a_run_has_one_colour_in_every_subplot_also_where_an_earlier_run_lacks_the_metric(tmp_path):
    """lr-SGD is run 1's only: each panel's colour cycle started afresh drew it in run 0's colour there."""
    runs = write_runs(tmp_path)
    fig = plot_runs([run.log_dir for run in runs])
    colours: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert len(colours) == 2 and all(len(c) == 1 for c in colours.values()), colours
    assert len(set.union(*colours.values())) == 2  # and the two runs' colours differ


def test_a_root_name_folder_means_all_its_versions_and_metrics_pick_subplots(tmp_path):
    write_runs(tmp_path)
    fig = plot_runs([tmp_path / "exp"], metrics=["val/acc"])
    assert [ax.get_title() for ax in fig.axes] == ["val/acc"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["exp/version_0", "exp/version_1"]
    with pytest.raises(ValueError, match=r"metric\(s\) \['val/los'\] not found in any run"):
        plot_runs([tmp_path / "exp"], metrics=["val/los"])
    with pytest.raises(ValueError, match="metrics is empty"):
        plot_runs([tmp_path / "exp"], metrics=[])


@pytest.mark.parametrize("name, folder", [(None, ""), ("", ""), ("exp/run", os.path.join("exp", "run"))])
def test_the_runs_of_a_logger_of_no_name_folder_or_a_nested_name_are_found_in_its_root_name(tmp_path, name, folder):
    """CSVLogger refused name=None, "" and "exp/run" (Lightning's loggers take them: root/version_N, and
    root/exp/run/version_N); the command finds their runs in root/name, root itself for no name."""
    for i in range(2):
        CSVLogger(tmp_path / "runs", name).log_metrics({"train/loss": 1.0 + i}, 1)
    where = tmp_path / "runs" / folder
    assert find_runs(where) == [os.path.join(str(where), f"version_{n}") for n in range(2)]
    assert main(["plot", str(where), "-o", str(tmp_path / "curves.png")]) == 0
    assert_png(tmp_path / "curves.png", min_bytes=1000)


def test_an_output_without_a_suffix_is_a_png_and_the_command_names_the_file_it_wrote(tmp_path, capsys):
    runs = write_runs(tmp_path)
    assert main(["plot", runs[0].log_dir, "-o", str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert_png(tmp_path / "curves.png")


def test_an_output_ending_in_a_dot_is_the_png_the_command_names(tmp_path, capsys):
    runs = write_runs(tmp_path)
    assert main(["plot", runs[0].log_dir, "-o", str(tmp_path / "curves.")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert_png(tmp_path / "curves.png")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["curves.png"]


@pytest.mark.parametrize("output", ["out" + os.sep, "out", "new" + os.sep])
def test_an_output_that_names_a_folder_is_a_usage_error(tmp_path, capsys, output):
    """``out/`` (existing or not) and an existing ``out`` would have given a hidden ``.png.png`` inside."""
    runs = write_runs(tmp_path / "runs")
    (tmp_path / "out").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["plot", runs[0].log_dir, "-o", os.path.join(tmp_path, output)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("loopkit plot: error: output ")
    assert "names a folder, not an image file" in captured.err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
    with pytest.raises(ValueError, match="names a folder"):
        plot_runs([runs[0].log_dir], os.path.join(tmp_path, output))


@pytest.mark.slow  # a fresh interpreter imports torch and matplotlib
def test_command_line_writes_the_png(tmp_path):
    runs = write_runs(tmp_path)
    out = tmp_path / "cli.png"
    result = subprocess.run(
        [sys.executable, "-m", "loopkit", "plot", runs[0].log_dir, runs[1].log_dir, "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert_png(out)


def test_a_missing_metrics_csv_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"no metrics.csv in {empty}"):
        plot_runs([empty], tmp_path / "x.png")
    assert main(["plot", str(empty), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loopkit plot: error: no metrics.csv in") and str(empty) in err
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_csv_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        plot_runs([tmp_path])
    (tmp_path / "metrics.csv").write_text("step,loss\n1,high\n")
    with pytest.raises(ValueError, match="line 2: not a number"):
        plot_runs([tmp_path])
    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\ninf,0.25\n")  # (int(inf) is an OverflowError)
    with pytest.raises(ValueError, match="line 3: not a number"):
        plot_runs([tmp_path])


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    runs = write_runs(tmp_path)
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import of any of them now fails
    with pytest.raises(ImportError, match=r"pip install 'loopkit\[plot\]'"):
        plot_runs([runs[0].log_dir])
    assert main(["plot", runs[0].log_dir, "-o", str(tmp_path / "x.png")]) == 1
    assert "needs matplotlib" in capsys.readouterr().err


def test_version_folders_come_in_the_order_of_their_numbers(tmp_path):
    """version_10 after version_9, not between version_1 and version_2 (as a sort of the names has it)."""
    for _ in range(12):
        CSVLogger(tmp_path, "exp").log_metrics({"loss": 1.0}, 1)
    expected = [str(tmp_path / "exp" / f"version_{n}") for n in range(12)]
    assert find_runs(tmp_path / "exp") == expected
    fig = plot_runs([tmp_path / "exp"])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [f"exp/version_{n}" for n in range(12)]


def test_run_folders_of_other_names_come_in_natural_order_with_the_versions(tmp_path):
    """Numbers inside names compared as numbers, the rest as text: not by the names' length (which put "b" and
    "zz" before every version_N and a long name after them)."""
    names = ["run_a", "version_2", "version_10", "b", "zz", "a_much_longer_name", "version_0"]
    for name in names:
        CSVLogger(tmp_path, "exp", version=name).log_metrics({"loss": 1.0}, 1)
    expected = ["a_much_longer_name", "b", "run_a", "version_0", "version_2", "version_10", "zz"]
    assert find_runs(tmp_path / "exp") == [str(tmp_path / "exp" / name) for name in expected]


def test_a_run_named_twice_is_drawn_once_with_its_short_label(tmp_path):
    """By its root/name folder and its own, by one path given twice, or through a symlink: one line each run,
    in the order first named, labelled name/version_N (not by the full path, as runs that share a label are)."""
    runs = write_runs(tmp_path)
    exp, first, second = tmp_path / "exp", runs[0].log_dir, runs[1].log_dir
    os.symlink(second, tmp_path / "link")
    v0, v1 = os.path.join("exp", "version_0"), os.path.join("exp", "version_1")
    for named, labels in [
        ([exp, first], [v0, v1]),
        ([second, exp], [v1, v0]),
        ([first, first, exp / "version_0" / "metrics.csv"], [v0]),
        ([second, tmp_path / "link", str(exp) + os.sep], [v1, v0]),
    ]:
        fig = plot_runs(named, metrics=["train/loss"])
        assert [line.get_label() for line in fig.axes[0].get_lines()] == labels, named
        assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [8] * len(labels)
    assert fig.axes[0].get_legend() is not None and plot_runs([first, first]).axes[0].get_legend() is None


def test_a_column_blank_in_every_row_has_no_series_and_no_subplot(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,a,blank,b\n1,0.5,,\n2,0.25,,2.0\n")
    assert read_metrics(tmp_path) == {"a": ([1, 2], [0.5, 0.25]), "b": ([2], [2.0])}
    assert [ax.get_title() for ax in plot_runs([tmp_path]).axes] == ["a", "b"]


@pytest.mark.parametrize(
    ("metrics", "columns", "grid"),
    [(4, 3, (2, 3)), (4, 2, (2, 2)), (7, 3, (3, 3)), (6, 3, (2, 3)), (2, 3, (1, 2)), (1, 3, (1, 1)), (3, 1, (3, 1))],
)
def test_the_grid_has_as_many_rows_as_the_metrics_need(tmp_path, metrics, columns, grid):
    names = [f"m{i}" for i in range(metrics)]
    logger = CSVLogger(tmp_path)
    logger.log_metrics({name: float(i) for i, name in enumerate(names)}, 1)
    fig = plot_runs([logger.log_dir], columns=columns)
    assert [ax.get_title() for ax in fig.axes] == names  # each metric its own subplot, in order
    rows, cols = grid
    for i, ax in enumerate(fig.axes):  # row by row, left to right, in a rows x cols grid
        assert ax.get_subplotspec().get_geometry() == (rows, cols, i, i)
    assert tuple(fig.get_size_inches()) == pytest.approx((4.5 * cols, 3.2 * rows))


def test_runs_alike_under_different_roots_get_labels_that_tell_them_apart(tmp_path):
    """Their name/version_N is the same: each is labelled by its path, in the legend too."""
    runs = [CSVLogger(tmp_path / root, "exp") for root in ("a", "b")]
    for i, run in enumerate(runs):
        run.log_metrics({"loss": float(i)}, 1)
    fig = plot_runs([run.log_dir for run in runs])
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == [run.log_dir for run in runs]
    assert [text.get_text() for text in fig.axes[0].get_legend().get_texts()] == labels
    assert [list(line.get_ydata()) for line in fig.axes[0].get_lines()] == [[0.0], [1.0]]
    # a run alone, or runs whose name/version_N differ, keep the short label
    other = CSVLogger(tmp_path / "a", "exp2")
    other.log_metrics({"loss": 2.0}, 1)
    fig = plot_runs([runs[0].log_dir, other.log_dir])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["exp/version_0", "exp2/version_0"]
    fig = plot_runs([runs[0].log_dir])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["exp/version_0"]
    assert fig.axes[0].get_legend() is None  # (one run: no legend)


def test_subplots_come_in_order_of_first_appearance_or_as_metrics_names_them(tmp_path):
    first, second = CSVLogger(tmp_path, "exp"), CSVLogger(tmp_path, "exp")
    for step, name in enumerate(("zeta", "alpha", "mu"), start=1):
        first.log_metrics({name: 1.0}, step)
    second.log_metrics({"beta": 1.0}, 1)
    second.log_metrics({"zeta": 1.0}, 2)
    assert [ax.get_title() for ax in plot_runs([tmp_path / "exp"]).axes] == ["zeta", "alpha", "mu", "beta"]
    assert [ax.get_title() for ax in plot_runs([second.log_dir, first.log_dir]).axes] == ["beta", "zeta", "alpha", "mu"]
    picked = plot_runs([tmp_path / "exp"], metrics=["mu", "beta", "zeta"])
    assert [ax.get_title() for ax in picked.axes] == ["mu", "beta", "zeta"]


def test_the_epoch_counter_with_logging_writes_is_no_panel_unless_named(tmp_path):
    """plot_runs drew the ``epoch`` column, the counter with_logging puts on every row (as Lightning's logger connector
    does), as a metric panel. Now it is left out of the default panels, and drawn when named."""
    import torch

    import loopkit

    model = torch.nn.Linear(3, 1)
    state = loopkit.TrainState.create(model, torch.optim.SGD(model.parameters(), lr=0.1))
    logger = CSVLogger(tmp_path, "run")
    step = loopkit.with_logging(loopkit.train_step(lambda m, b: m(b).pow(2).mean()), logger, every_n_steps=2)
    loopkit.run_epochs(step, state, [torch.ones(4, 3)] * 4, epochs=2, progress=False)
    assert "epoch" in read_metrics(logger.log_dir)  # the file's column, as written
    assert [ax.get_title() for ax in plot_runs([logger.log_dir]).axes] == ["train/loss", "train/loss_epoch"]
    assert [ax.get_title() for ax in plot_runs([logger.log_dir], metrics=["epoch"]).axes] == ["epoch"]
