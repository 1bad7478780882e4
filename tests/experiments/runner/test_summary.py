"""experiments.runner.summary: the end-of-run summary and the end-of-sweep table."""

from __future__ import annotations

import json

from experiments.runner.summary import SweepSummary, run_summary, sweep_table

RESULTS = {
    "method": "lowra", "quant_method": "lowra", "model": "stories260k", "data": "tinystories", "metric": "perplexity",
    "bits_target": 2.0, "bits_nominal": 1.99995, "bits_effective": 3.6717, "ppl_fp": 6.04, "ppl_quantized": 131.6,
    "ppl_loftq": 89.6, "ppl_finetuned": 12.09, "train_steps": 300, "train_loss_final": 2.4123,
    "train_losses": [9.87654321] * 300, "resumed_from_step": 0, "optimizer": "adamw", "quantize_time_s": 12.3,
    "train_time_s": 80.1, "wall_time_s": 111.0, "peak_memory_bytes": 3 * 2**30, "device": "cpu",
    "run_dir": "/runs/x",
}


def test_run_summary_has_the_key_numbers_and_no_losses():
    text = run_summary(RESULTS)
    for piece in ("stories260k", "lowra", "2.00 target", "2.000 nominal", "3.672 effective",
                  "6.04 (fp) → 131.60 (quantized) → 89.60 (init) → 12.09 (fine-tuned)", "300 steps",
                  "quantize 12.3 s", "train 80.1 s", "total 111.0 s", "3.0 GiB", "/runs/x/results.json"):
        assert piece in text, piece
    assert "9.876" not in text and len(text.splitlines()) <= 8 and len(text) < 1000


def test_run_summary_without_training_or_init_and_with_rouge():
    r = dict(RESULTS, ppl_loftq=None, ppl_finetuned=None, train_steps=0)
    text = run_summary(r)
    assert "(init)" not in text and "(fine-tuned)" not in text and "train.max_steps=0" in text
    rouge = {k: v for k, v in RESULTS.items() if not k.startswith("ppl")}
    rouge |= {"metric": "rouge", "rouge_fp": {"rouge1": 40.0, "rouge2": 18.0, "rougeL": 33.0}, "rouge_finetuned":
              {"rouge1": 41.0, "rouge2": 19.0, "rougeL": 34.0}}
    assert "ROUGE-1/2/L 40.0/18.0/33.0 (fp) → 41.0/19.0/34.0 (fine-tuned)" in run_summary(rouge)


def _job(root, name, **files):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    for fname, content in files.items():
        (job / f"{fname}.json").write_text(json.dumps(content))
    return job


def test_sweep_table_one_row_per_job(tmp_path, capsys):
    _job(tmp_path, "a_lowra_b2", results=RESULTS)
    _job(tmp_path, "b_qlora_b2", skipped={"reason": "quant.bits=2 is not accepted by quant=qlora"})
    _job(tmp_path, "c_lowra_b3", failed={"reason": "RuntimeError: boom", "status": "failed"})
    _job(tmp_path, "d_lowra_b4")
    table = sweep_table(tmp_path)
    lines = table.splitlines()
    assert lines[0].startswith("| job | method | bits | nominal | effective | fp | quantized | init | fine-tuned")
    assert len(lines) == 2 + 4
    assert "| a_lowra_b2 | lowra | 2.00 | 2.000 | 3.672 | 6.04 | 131.60 | 89.60 | 12.09 | 300 |" in table
    assert "skipped: quant.bits=2 is not accepted" in lines[3] and "FAILED: RuntimeError: boom" in lines[4]
    assert "incomplete" in lines[5]

    class Cfg:  # what Hydra passes: config.hydra.sweep.dir
        class hydra:
            class sweep:
                dir = str(tmp_path)

    SweepSummary().on_multirun_end(Cfg())
    out = capsys.readouterr().out
    assert "sweep finished" in out and "| a_lowra_b2 |" in out
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 5
