"""The lm-eval bridge on a tiny random llama with the real SmolLM2 tokenizer and local JSONL tasks.

The tasks live in tests/eval/fixtures/lm_eval_tasks; the tests copy their YAML files into the
temporary folder with absolute `data_files` (datasets resolves relative ones against the current
directory) and a `cache_dir` there, so nothing is written outside it. All of it runs offline.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import randomize_

pytest.importorskip("lm_eval")

from sheared.errors import UserError
from sheared.eval.harness import _offline, format_table, run_lm_eval

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval_tasks"
MC_TASK, TF_TASK = "sheared_tiny_mc", "sheared_tiny_tf"
GROUP = "sheared_tiny"  # both tasks, acc averaged weighted by size (defined by the task_dir fixture)
MC_PROMPT = "Question: {question}\nAnswer:"  # the task's doc_to_text, checked against its YAML below
TARGET_DELIMITER = " "  # lm-eval's default between prompt and choice


def _docs(task: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{task}.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tok) -> Path:
    """A random 2-layer llama (hidden 32) with the SmolLM2 tokenizer, saved as a HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = smollm2_tok
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    # Large seeded random weights make the log-likelihoods depend clearly on the prompt, so a bridge
    # that scored a different text would not match our own scores by chance.
    model = randomize_(AutoModelForCausalLM.from_config(config), seed=0)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The fixture tasks with absolute data_files, and the datasets cache inside the temp folder."""
    root = tmp_path_factory.mktemp("lm-eval")
    tasks = root / "tasks"
    tasks.mkdir()
    for src in sorted(FIXTURES.glob("*.yaml")):
        config = yaml.safe_load(src.read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(FIXTURES / f) for split, f in files.items()}
        config["dataset_kwargs"]["cache_dir"] = str(root / "datasets-cache")
        (tasks / src.name).write_text(yaml.safe_dump(config, sort_keys=False))
    group = {
        "group": GROUP,
        "task": [MC_TASK, TF_TASK],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
    }
    (tasks / f"{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return tasks


@pytest.fixture(scope="module")
def mc_results(model_dir, task_dir) -> dict:
    return run_lm_eval(model_dir, [MC_TASK], include_path=task_dir)


@pytest.fixture(scope="module")
def own_mc_correct(model_dir) -> tuple[list[bool], list[bool], float]:
    """Per question: whether our own log-likelihood choice is right (acc, acc_norm), and the
    smallest gap between the best two choices (so float noise cannot flip a prediction).

    Scored as lm-eval scores a causal LM: encode prompt + " " + choice whole, the choice's tokens
    are what follows the prompt's tokens, and its log-likelihood is the sum of their log-probs.
    acc_norm divides by the choice's length in characters.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = _docs(MC_TASK)
    pairs = []  # (number of prompt tokens, prompt + choice tokens) of every choice of every doc
    for doc in docs:
        context = MC_PROMPT.format(question=doc["question"])
        context_ids = tok.encode(context)
        for choice in doc["choices"]:
            whole = tok.encode(context + TARGET_DELIMITER + choice)
            assert whole[: len(context_ids)] == context_ids  # the prompt tokenizes the same inside
            pairs.append((len(context_ids), whole))
    # One forward pass, padded on the right: causal attention keeps the padding out of the real tokens.
    ids = torch.zeros(len(pairs), max(len(w) for _, w in pairs), dtype=torch.long)  # (N, T)
    for row, (_, whole) in enumerate(pairs):
        ids[row, : len(whole)] = torch.tensor(whole)
    with torch.no_grad():
        logprobs = model(ids).logits.float().log_softmax(-1)  # (N, T, V)
    # log p(token p | tokens < p), summed over the choice's tokens p
    all_lls = [
        sum(logprobs[row, p - 1, whole[p]].item() for p in range(n_context, len(whole)))
        for row, (n_context, whole) in enumerate(pairs)
    ]
    correct, correct_norm, min_gap = [], [], math.inf
    for doc in docs:
        lls, all_lls = all_lls[: len(doc["choices"])], all_lls[len(doc["choices"]) :]
        ranked = sorted(lls, reverse=True)
        min_gap = min(min_gap, ranked[0] - ranked[1])
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        correct.append(lls.index(max(lls)) == doc["answer"])
        correct_norm.append(normed.index(max(normed)) == doc["answer"])
    return correct, correct_norm, min_gap


def test_fixture_prompt_matches_yaml():
    config = yaml.safe_load((FIXTURES / f"{MC_TASK}.yaml").read_text())
    assert config["doc_to_text"] == MC_PROMPT.replace("{question}", "{{question}}")
    assert config.get("target_delimiter", TARGET_DELIMITER) == TARGET_DELIMITER


def test_multiple_choice_metrics_and_sample_count(mc_results, model_dir, task_dir):
    metrics = mc_results["tasks"][MC_TASK]
    for name in ("acc,none", "acc_norm,none"):
        assert isinstance(metrics[name], float)
        assert 0.0 <= metrics[name] <= 1.0
        assert metrics[name.replace(",", "_stderr,")] > 0
    assert set(metrics) == {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    num_docs = len(_docs(MC_TASK))
    assert num_docs == 16
    assert mc_results["n_samples"][MC_TASK] == {"original": num_docs, "effective": num_docs}
    config = mc_results["config"]
    assert config["model_dir"] == str(model_dir.resolve())
    assert config["include_path"] == str(task_dir.resolve())
    assert config["num_fewshot_per_task"] == {MC_TASK: 0}
    assert mc_results["versions"]["tasks"] == {MC_TASK: 1.0}
    json.dumps(mc_results, allow_nan=False)  # plain JSON


def test_accuracy_equals_own_loglikelihood_choice(mc_results, own_mc_correct):
    correct, correct_norm, min_gap = own_mc_correct
    assert min_gap > 1e-3  # predictions are clear-cut, far above float32 noise
    metrics = mc_results["tasks"][MC_TASK]
    assert metrics["acc,none"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(sum(correct_norm) / len(correct_norm), abs=1e-12)
    assert 0 < sum(correct) < len(correct)  # neither all right nor all wrong: a real comparison


def test_limit_evaluates_the_first_documents(model_dir, task_dir, own_mc_correct):
    results = run_lm_eval(model_dir, [MC_TASK], include_path=task_dir, limit=4)
    assert results["n_samples"][MC_TASK] == {"original": 16, "effective": 4}
    correct = own_mc_correct[0][:4]
    assert results["tasks"][MC_TASK]["acc,none"] == pytest.approx(sum(correct) / 4, abs=1e-12)
    assert results["config"]["limit"] == 4


def test_two_choice_task_is_deterministic(model_dir, task_dir):
    first = run_lm_eval(model_dir, [TF_TASK], include_path=task_dir, batch_size=5)
    second = run_lm_eval(model_dir, [TF_TASK], include_path=task_dir, batch_size=5)
    assert first["n_samples"][TF_TASK]["effective"] == len(_docs(TF_TASK)) == 12
    assert first["tasks"] == second["tasks"]
    assert 0.0 <= first["tasks"][TF_TASK]["acc,none"] <= 1.0


def test_group_with_few_shot(model_dir, task_dir):
    results = run_lm_eval(model_dir, [GROUP], include_path=task_dir, num_fewshot=1, limit=4)
    assert list(results["n_samples"]) == [MC_TASK, TF_TASK]
    assert all(n["effective"] == 4 for n in results["n_samples"].values())
    assert results["config"]["num_fewshot_per_task"] == {GROUP: 1, MC_TASK: 1, TF_TASK: 1}
    accs = [results["tasks"][t]["acc,none"] for t in (MC_TASK, TF_TASK)]
    assert results["tasks"][GROUP]["acc,none"] == pytest.approx(sum(accs) / 2)  # equal sizes under limit
    assert GROUP in format_table(results)


def test_format_table(mc_results):
    table = format_table(mc_results)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "filter", "n", "value", "stderr"]
    metrics = mc_results["tasks"][MC_TASK]
    acc_row = next(line for line in lines if line.split()[:2] == [MC_TASK, "acc"])
    assert acc_row.split()[2:] == [
        "none",
        "16",
        f"{metrics['acc,none']:.4f}",
        f"{metrics['acc_stderr,none']:.4f}",
    ]
    assert any(line.split()[:2] == [MC_TASK, "acc_norm"] for line in lines)
    assert len(lines) == 4  # header, rule, acc, acc_norm (stderr entries are columns, not rows)


def test_unknown_task_is_a_user_error(model_dir, task_dir):
    with pytest.raises(UserError, match=r"unknown lm-eval task 'no_such_task_xyz'") as info:
        run_lm_eval(model_dir, [MC_TASK, "no_such_task_xyz"], include_path=task_dir)
    assert MC_TASK not in str(info.value)
    assert "\n" not in str(info.value)


def test_model_dir_errors(tmp_path, task_dir):
    with pytest.raises(UserError, match="does not exist"):
        run_lm_eval(tmp_path / "missing", [MC_TASK], include_path=task_dir)
    with pytest.raises(UserError, match=r"no config\.json"):
        run_lm_eval(tmp_path, [MC_TASK], include_path=task_dir)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        run_lm_eval(tmp_path, [MC_TASK], include_path=task_dir)


def test_missing_task_data_is_a_user_error(model_dir, tmp_path):
    config = yaml.safe_load((FIXTURES / f"{MC_TASK}.yaml").read_text())
    config["dataset_kwargs"]["data_files"] = {"test": str(tmp_path / "gone.jsonl")}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"data of lm-eval task 'sheared_tiny_mc' was not found"):
        run_lm_eval(model_dir, [MC_TASK], include_path=tmp_path / "tasks")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float8"}, "dtype 'float8'"),
        ({"limit": 0}, "limit must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"num_fewshot": -1}, "num_fewshot must be >= 0"),
        ({"include_path": "/nonexistent/tasks"}, "include_path '/nonexistent/tasks'"),
    ],
)
def test_bad_arguments(model_dir, kwargs, message):
    with pytest.raises(UserError, match=message):
        run_lm_eval(model_dir, [MC_TASK], **kwargs)


def test_missing_lm_eval_names_the_extra(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'sheared\[eval\]'"):
        run_lm_eval(model_dir, [MC_TASK])


def test_offline_switches_are_restored(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with _offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.is_offline_mode()
        assert datasets.config.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


def test_a_task_folder_with_relative_data_files_works_from_any_directory(model_dir, tmp_path, monkeypatch):
    """The fixture YAMLs name their data files relative to their folder; the include path is relative
    to a working directory that is neither that folder nor the repository."""
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = os.path.relpath(FIXTURES, elsewhere)
    results = run_lm_eval(model_dir, [TF_TASK], include_path=relative, limit=4)
    assert results["n_samples"][TF_TASK]["effective"] == 4
    assert 0.0 <= results["tasks"][TF_TASK]["acc,none"] <= 1.0
    assert results["config"]["include_path"] == str(FIXTURES.resolve())
    assert (
        "sheared_tiny_tf.jsonl\n" in (FIXTURES / f"{TF_TASK}.yaml").read_text()
    )  # the folder is left as it was
