"""``loopkit.plot`` and ``python -m loopkit plot``: curves drawn from CSVLogger runs."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from loopkit.__main__ import main
from loopkit.loggers import CSVLogger
from loopkit.plot import plot_runs, read_metrics

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


def test_a_root_name_folder_means_all_its_versions_and_metrics_pick_subplots(tmp_path):
    write_runs(tmp_path)
    fig = plot_runs([tmp_path / "exp"], metrics=["val/acc"])
    assert [ax.get_title() for ax in fig.axes] == ["val/acc"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["exp/version_0", "exp/version_1"]
    with pytest.raises(ValueError, match=r"metric\(s\) \['val/los'\] not found in any run"):
        plot_runs([tmp_path / "exp"], metrics=["val/los"])
    with pytest.raises(ValueError, match="metrics is empty"):
        plot_runs([tmp_path / "exp"], metrics=[])


def test_an_output_without_a_suffix_is_a_png_and_the_command_names_the_file_it_wrote(tmp_path, capsys):
    runs = write_runs(tmp_path)
    assert main(["plot", runs[0].log_dir, "-o", str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    assert_png(tmp_path / "curves.png")


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
