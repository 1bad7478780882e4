"""experiments.studies.collect_results builds one CSV row per run directory (fake minimal inputs)."""

from __future__ import annotations

import csv
import json

from experiments.studies.collect_results import COLUMNS, collect


def _fake_run(root, group, name, method, bits, ppl, overrides):
    d = root / group / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "results.json").write_text(json.dumps({
        "method": method, "bits_target": bits, "seed": 0, "bits_nominal": bits, "bits_effective": bits + 1,
        "ppl_fp": 6.0, "ppl_quantized": 3 * ppl, "ppl_loftq": None, "ppl_finetuned": ppl,
        "train_steps": 1, "rank": 2, "eval": {"max_tokens": 8}, "memory": {"model_total": 100},
        "bits_by_layer_type": {"q_proj": {"1": 3, "2": 1}},
    }))
    (d / "quant_report.json").write_text(json.dumps({"total_sse_quant": 1.5}))


def test_collect_writes_one_row_per_run(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "main", "a", "lowra", 2.0, 10.0, ["quant=lowra", "+bits=2", "logger=none"])
    _fake_run(runs, "abl", "b", "lowra", 2.0, 12.0, ["quant=lowra", "+bits=2", "quant.loftq_iters=0"])
    out = tmp_path / "out"
    rows = collect(runs, out, wikitext=False, make_plots=False)
    assert len(rows) == 2
    with open(out / "stories260k_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS
    by_group = {r["group"]: r for r in table}
    assert by_group["abl"]["variant"] == "quant.loftq_iters=0"
    assert by_group["main"]["variant"] == ""
    assert by_group["main"]["command"].startswith("python -m experiments.run quant=lowra +bits=2")
    assert float(by_group["main"]["weight_sse"]) == 1.5
    assert (out / "stories260k_tables.md").read_text().count("| lowra |") == 1
