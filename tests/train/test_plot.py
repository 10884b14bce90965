"""plot.py: a run's metrics.jsonl to a PNG, and its one-line refusals."""

import json

import pytest

import plot


@pytest.fixture
def workdir(tmp_path):
  rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_sec": 1000.0} for s in range(1, 11)]
  rows.append({"step": 10, "eval_loss": 4.2, "eval_ppl": 66.7})
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return tmp_path


def test_plot_writes_a_png_where_it_says(workdir):
  out = plot.plot(str(workdir), str(workdir / "m.png"))
  assert out == str(workdir / "m.png") and (workdir / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert plot.plot(str(workdir), str(workdir / "bare")) == str(workdir / "bare.png")  # matplotlib's own suffix
  assert (workdir / "bare.png").exists() and not (workdir / "bare").exists()


def test_plot_refuses_a_directory_and_a_run_without_metrics(workdir, tmp_path_factory):
  with pytest.raises(ValueError, match=f"--out '{workdir}' is a directory"):
    plot.plot(str(workdir), str(workdir))
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(ValueError, match="no metrics in"):
    plot.plot(str(empty), str(empty / "m.png"))
