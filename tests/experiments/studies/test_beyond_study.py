"""experiments.studies.beyond: its table reads the runner's results.json + samples.json of each seed."""

from __future__ import annotations

import json

import pytest

from experiments.studies import beyond as beyond_study


def _fake_run(out, label, seed, ppl, samples):
    run = out / f"{label}_s{seed}"
    run.mkdir(parents=True)
    res = {"seed": seed, "bits_nominal": 1.15, "bits_effective": 2.377, "ppl_fp": 6.23, "ppl_quantized": 2000.0,
           "ppl_loftq": 120.0, "ppl_finetuned": ppl, "train_time_s": 100.0, "wall_time_s": 200.0,
           "memory": {"stages": {"stages": {"fine-tune": {"peak_rss_bytes": 700 * 2**20}}}}, "distill": None}
    (run / "results.json").write_text(json.dumps(res))
    (run / "samples.json").write_text(json.dumps({"ppl_samples": samples}))


def test_table_is_mean_and_std_over_seeds(tmp_path):
    _fake_run(tmp_path, "lowra_b1.15", 0, 24.0, 20.0)
    _fake_run(tmp_path, "lowra_b1.15", 1, 26.0, 22.0)
    (tmp_path / "lowra_b1.5_s0").mkdir()  # unfinished (no samples.json): not in the table
    (tmp_path / "fp_samples_ppl.json").write_text(json.dumps({"ppl_samples_fp": 4.07}))
    text = beyond_study.write_tables("distill", tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| lowra_b1.15 "))
    assert "| 25.00 ± 1.41 | 21.00 ± 1.41 |" in row and "| 700 ± 0 | 2 |" in row
    assert "lowra_b1.5 " not in text and "on its own samples 4.07" in text
    saved = json.loads((tmp_path / "distill_table.json").read_text())
    assert [r["seed"] for r in saved["rows"]["lowra_b1.15"]] == [0, 1]


def test_unknown_label_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(beyond_study, "fp_samples", lambda path, model_dir: [[1, 2, 3]])
    (tmp_path / "fp_samples_ppl.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--labels: \['nope'\] not in study 'front'"):
        beyond_study.run_study("front", [0], 1, tmp_path, ["nope"])
