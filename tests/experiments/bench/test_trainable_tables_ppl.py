"""experiments.bench.trainable_tables_ppl: collects the runs, refuses a missing or mislabelled one."""

from __future__ import annotations

import json

import pytest

from experiments.bench.trainable_tables_ppl import collect, main


def _write(root, seed: int, mode: str, ppl: float, ran: str | None = None) -> None:
    d = root / f"s{seed}_{mode}"
    d.mkdir()
    res = {"ppl_finetuned": ppl, "train_time_s": 10.0, "config": {"train": {"codebooks": ran or mode}}}
    (d / "results.json").write_text(json.dumps(res))


def test_collects_and_writes_the_table(tmp_path, capsys):
    for s in (0, 1):
        _write(tmp_path, s, "frozen", 20.0 + s)
        _write(tmp_path, s, "trainable", 18.0 + s)
    out = tmp_path / "out.json"
    main(["--runs", str(tmp_path), "--seeds", "0", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["mean_ppl_finetuned"] == {"frozen": 20.5, "trainable": 18.5}
    assert "| 1 | 21.00 | 19.00 | 0.905 |" in capsys.readouterr().out


def test_missing_or_mislabelled_runs_are_errors(tmp_path):
    _write(tmp_path, 0, "frozen", 20.0)
    with pytest.raises(FileNotFoundError, match="seed 0, codebooks trainable"):
        collect(tmp_path, [0])
    _write(tmp_path, 0, "trainable", 18.0, ran="frozen")
    with pytest.raises(ValueError, match="not trainable"):
        collect(tmp_path, [0])
