"""experiments.studies.accuracy_table groups seeds per label and writes the markdown + JSON tables."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.studies.accuracy_table import collect, markdown


def _run(root: Path, name: str, model: str, ppl: float, overrides: list[str], **extra: object) -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "results.json").write_text(json.dumps({
        "model": model, "ppl_fp": 6.0, "ppl_quantized": 50.0, "ppl_loftq": 30.0, "ppl_finetuned": ppl,
        "bits_nominal": 2.0, "bits_effective": 3.5, "error_table": "kfac", "init": "calibrated",
        "budget_kind": "nominal", **extra,
    }))


def test_seeds_are_grouped_with_mean_and_std(tmp_path: Path) -> None:
    for seed, ppl in ((0, 12.0), (1, 14.0)):
        _run(tmp_path, f"lowra_b2_s{seed}", "stories260k", ppl, ["quant=lowra", "+bits=2", f"seed={seed}",
                                                                 "hydra.run.dir=x"])
    _run(tmp_path, "loftq_nf_b2_s0", "stories260k", 35.0, ["quant=loftq", "+bits=2"])
    table = collect(tmp_path)
    assert set(table["stories260k"]) == {"lowra_b2", "loftq_nf_b2"}
    text = markdown(table)
    assert "13.00 ± 1.41" in text and "| 2 |" in text and "35.00" in text
    assert "`python -m experiments.run quant=lowra +bits=2`" in text  # seed and hydra keys dropped
    assert "kfac · calibrated · nominal" in text and "(fp ppl 6.00)" in text


def test_the_init_names_its_alternations_and_codebooks(tmp_path: Path) -> None:
    _run(tmp_path, "lowra_b1.15_s0", "stories260k", 25.0, ["quant=lowra", "+bits=1.15"], loftq_iters=4,
         init_codebooks="relearn")
    _run(tmp_path, "old_b1.5_s0", "stories260k", 21.0, ["quant=lowra", "+bits=1.5"],
         lowra_config={"loftq_iters": 8, "init_codebooks": "fixed"})  # an older results.json: from its config
    text = markdown(collect(tmp_path))
    assert "kfac · calibrated ×4 relearn · nominal" in text and "kfac · calibrated ×8 · nominal" in text
