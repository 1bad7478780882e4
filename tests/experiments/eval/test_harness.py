"""lm-evaluation-harness on stories260K (local TinyStories tasks), hub tasks offline, WikiText-2 (GPTQ).

Every number lm-eval returns here is recomputed independently from the model's logits (the same
tokenization rules, plain PyTorch), and the GPTQ-convention perplexity is checked against the GPTQ
repository's loop (``model(batch, labels=batch).loss`` per window, ``exp(mean)``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments.eval.harness import (
    CLOZE_TASK,
    LOCAL_TASKS,
    ROLLING_TASK,
    ZERO_SHOT_TASKS,
    HarnessUnavailableError,
    cloze_documents,
    default_wikitext,
    expand_tasks,
    main,
    prepare_tasks,
    run_lm_eval,
    story_sentences,
    wikitext2_perplexity,
    wikitext2_rows,
    write_local_tasks,
)
from experiments.runner.config_check import REPO_ROOT

ASSETS = Path(os.environ.get("LOWRA_ASSETS") or REPO_ROOT.parent / "shared" / "assets")
STORIES = ASSETS / "models" / "stories260K"


@pytest.fixture(scope="module")
def stories():
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    info = write_local_tasks(d)
    return d, info


def test_expand_tasks_aliases_and_bad_input():
    assert expand_tasks("local") == list(LOCAL_TASKS)
    assert expand_tasks("zeroshot,arc_easy") == list(ZERO_SHOT_TASKS)  # no duplicates, order kept
    assert expand_tasks(["piqa", "local"]) == ["piqa", *LOCAL_TASKS]
    with pytest.raises(ValueError, match="no lm-eval task"):
        expand_tasks(" , ")


def test_cloze_documents_are_story_endings_against_other_endings(task_dir):
    d, info = task_dir
    docs = [json.loads(line) for line in (d / "tinystories_cloze.jsonl").read_text().splitlines()]
    assert len(docs) == info["cloze_docs"] > 300 and info["heldout_stories"] == 430
    stories = [json.loads(line)["text"] for line in (d / "tinystories_stories.jsonl").read_text().splitlines()]
    endings = {story_sentences(s)[-1] for s in stories}
    for doc in docs:
        choices, label = doc["choices"], doc["label"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= label < 4
        assert all(c in endings for c in choices)
    # the true ending closes the context's own story
    by_context = {" ".join(story_sentences(s)[:-1]): story_sentences(s)[-1] for s in stories}
    assert all(by_context[doc["context"]] == doc["choices"][doc["label"]] for doc in docs)
    assert len({doc["label"] for doc in docs}) == 4  # the gold position is drawn, not fixed
    assert cloze_documents(stories[:50], seed=1) == cloze_documents(stories[:50], seed=1)
    assert cloze_documents(stories[:50], seed=1) != cloze_documents(stories[:50], seed=2)
    with pytest.raises(ValueError, match="n_choices"):
        cloze_documents(stories, n_choices=1)
    yaml = (d / f"{CLOZE_TASK}.yaml").read_text()
    assert "output_type: multiple_choice" in yaml and str(d / "tinystories_cloze.jsonl") in yaml


def test_wikitext2_rows_rebuild_the_hub_split(tmp_path):
    raw, layout = default_wikitext()
    rows = wikitext2_rows(raw, layout)
    assert len(rows) == 4358 and rows.count("") == 1467  # the Hub's wikitext-2-raw-v1 test split
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert all(r.endswith(" \n") for r in rows if r)
    bad = tmp_path / "layout.tokens"
    bad.write_text(" \n = Robert <unk> = \n")
    with pytest.raises(ValueError, match="not the same split"):
        wikitext2_rows(raw, bad)


def test_wikitext2_perplexity_is_the_gptq_loop(stories):
    model, tok = stories
    window, n = 128, 3
    r = wikitext2_perplexity(model, tok, window=window, max_windows=n, batch_size=2, progress=False)
    # the GPTQ repository's evaluation (datautils.get_wikitext2 + llama_eval), written out
    raw, layout = default_wikitext()
    testenc = tok("\n\n".join(wikitext2_rows(raw, layout)), return_tensors="pt").input_ids
    nlls = []
    with torch.no_grad():
        for i in range(n):
            batch = testenc[:, i * window : (i + 1) * window]
            nlls.append(model(batch, labels=batch).loss.float() * window)
    gptq = math.exp(float(torch.stack(nlls).sum() / (n * window)))
    assert r["ppl"] == pytest.approx(gptq, rel=1e-5)
    assert r["window"] == window and r["windows"] == n and r["predicted_tokens"] == n * (window - 1)
    assert r["corpus_tokens"] == testenc.shape[1] and r["windows_total"] == testenc.shape[1] // window
    assert r["dropped_tail_tokens"] == testenc.shape[1] % window
    with pytest.raises(ValueError, match="exceeds the model's context"):
        wikitext2_perplexity(model, tok, window=2048)


def _loglik(model, ids: list[int], first: int) -> float:
    """Σ log p(ids[t] | ids[:t]) for t ≥ first."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))


def test_local_tasks_through_lm_eval_match_an_independent_scoring(stories, task_dir):
    model, tok = stories
    d, _ = task_dir
    limit = 16
    res = run_lm_eval(model, tok, prepare_tasks(list(LOCAL_TASKS), d), batch_size=4, limit=limit, bootstrap_iters=0)
    assert set(res) == set(LOCAL_TASKS)
    assert res[CLOZE_TASK]["samples"] == limit == res[ROLLING_TASK]["samples"]
    # multiple choice: lm-eval's pair encoding (context with the tokenizer's BOS, " " + choice)
    docs = [json.loads(line) for line in (d / "tinystories_cloze.jsonl").read_text().splitlines()][:limit]
    acc = acc_norm = 0
    for doc in docs:
        ctx = tok(doc["context"]).input_ids
        lls = [_loglik(model, tok(doc["context"] + " " + c).input_ids, len(ctx)) for c in doc["choices"]]
        acc += max(range(4), key=lambda i: lls[i]) == doc["label"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["label"]
    assert res[CLOZE_TASK]["acc"] == pytest.approx(acc / limit)
    assert res[CLOZE_TASK]["acc_norm"] == pytest.approx(acc_norm / limit)
    # rolling: every token of the story scored after one BOS (context only)
    texts = [json.loads(line)["text"] for line in (d / "tinystories_stories.jsonl").read_text().splitlines()][:limit]
    ll = sum(_loglik(model, [tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids], 1) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert res[ROLLING_TASK]["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
    assert res[ROLLING_TASK]["word_perplexity"] == pytest.approx(math.exp(-ll / n_words), rel=1e-5)
    assert res[ROLLING_TASK]["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)


@pytest.mark.slow
def test_hub_tasks_offline_fail_with_a_clear_message(monkeypatch, task_dir, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, _ = task_dir
    with pytest.raises(HarnessUnavailableError, match="dataset hub is unreachable") as err:
        prepare_tasks(["arc_easy", CLOZE_TASK, "boolq"], d)
    assert "arc_easy" in str(err.value) and "boolq" in str(err.value) and CLOZE_TASK not in str(err.value)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        prepare_tasks(["no_such_task_xyz"], d)
    # the CLI: exit status 2 and one message, no traceback, before any model is loaded
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", "/nonexistent", "--tasks", f"zeroshot,{CLOZE_TASK}", "--task-dir", str(d),
              "--window", "0"])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "error:" in stderr and "dataset hub is unreachable" in stderr and "Traceback" not in stderr
    assert all(t in stderr for t in ZERO_SHOT_TASKS)


@pytest.mark.slow
def test_cli_on_a_quantized_adapted_checkpoint(stories, tmp_path, capsys, caplog):
    """The CI check: a 2-bit LowRA stories260K with LoftQ adapters, saved, evaluated by the CLI; the JSON
    goes beside the checkpoint, named by model, method and bits (issue 32), and lm-eval's warning about a
    model instance is not shown."""
    import lowra

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    rep = lowra.quantize_model(model, bits=2, rank=2, alpha=4, **lowra.PAPER)
    assert any(float(m.lora_B.detach().abs().sum()) > 0 for _, m in lowra.lowra_layers(model))  # adapted (LoftQ)
    ckpt = lowra.save_quantized(model, tmp_path / "run" / "model", report=rep, source_model=str(STORIES))
    caplog.set_level(logging.WARNING)
    main(["--checkpoint", str(ckpt), "--window", "256", "--max-windows", "2", "--limit", "8",
          "--bootstrap-iters", "0", "--batch-size", "4", "--no-progress"])
    assert "not of type" not in caplog.text
    out = tmp_path / "run" / f"harness_stories260K_lowra_b{rep.bits_nominal:.2f}.json"
    res = json.loads(out.read_text())
    assert res["model"]["name"] == "stories260K"
    lowra.verify_checksums(ckpt)  # nothing was written into the checkpoint
    assert res["model"]["method"] == "lowra" and res["bits"]["bits_target"] == 2
    assert res["bits"]["bits_nominal"] == pytest.approx(rep.bits_nominal)
    assert res["window"] == 256 and res["wikitext2"]["window"] == 256 and res["wikitext2"]["windows"] == 2
    assert set(res["tasks"]) == set(LOCAL_TASKS) and res["lm_eval"]["limit"] == 8
    assert 0.0 <= res["tasks"][CLOZE_TASK]["acc"] <= 1.0 and res["tasks"][ROLLING_TASK]["byte_perplexity"] > 1.0
    # the same number as the library's own evaluation of the loaded model
    loaded = lowra.load_quantized(str(ckpt))
    tok = AutoTokenizer.from_pretrained(STORIES)
    direct = wikitext2_perplexity(loaded, tok, window=256, max_windows=2, progress=False)
    assert res["wikitext2"]["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    table = capsys.readouterr().out
    assert "wikitext2 (GPTQ, token-level, window 256, first 2 of" in table and CLOZE_TASK in table


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from experiments.runner.config_check import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="run", overrides=overrides)


RUN_SMALL = ["+bits=2", "train.max_steps=2", "train.batch_size=2", "train.seq_len=64", "eval.max_tokens=512",
             "eval.fp=false", "logger=none", "progress=false", "save_model=false"]


def test_runner_eval_harness_rejects_a_window_beyond_the_context_before_quantizing(tmp_path, monkeypatch):
    from experiments.runner.config_check import ConfigError
    from experiments.runner.run import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose([*RUN_SMALL, "eval.harness.enabled=true"])  # window 2048 > stories260K's 512
    with pytest.raises(ConfigError, match=r"eval.harness.window=2048 exceeds the model's context"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "quant_report.json").exists()  # failed in the load stage


@pytest.mark.slow
def test_runner_eval_harness_after_fine_tuning(tmp_path, monkeypatch):
    from experiments.runner.run import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _compose([*RUN_SMALL, "eval.harness.enabled=true", "eval.harness.window=256", "eval.harness.max_windows=2",
                    "eval.harness.limit=4", "eval.harness.bootstrap_iters=0", "eval.harness.batch_size=4"])
    r = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "harness.json").read_text())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["harness"] == r["harness"]
    assert saved["model"]["stage"] == "fine-tuned" and saved["bits"]["bits_nominal"] == r["bits_nominal"]
    assert r["harness"]["window"] == 256 and r["harness"]["wikitext2"]["windows"] == 2
    assert set(r["harness"]["tasks"]) == set(LOCAL_TASKS)
    assert all(r["harness"]["tasks"][t]["samples"] == 4 for t in LOCAL_TASKS)
    assert (tmp_path / "run" / "lm_eval_tasks" / f"{CLOZE_TASK}.yaml").is_file()  # kept: lm_eval --include_path
