"""Distillation in the loop: teacher == student gives KD 0, α = 0 is the plain loss, crash + resume
equals an uninterrupted run with a teacher, a teacher of another tokenizer is refused."""

from __future__ import annotations

import shutil

import pytest

from sheared.cli import main
from sheared.config import load_config
from sheared.data.sampler import DomainMixtureSampler
from sheared.run_dir import read_metrics
from sheared.train.config import TrainConfig
from sheared.train.loop import run

STEPS = ["train.steps=4", "train.save_interval=2", "train.eval_interval=2", "data.max_eval_sequences=2"]
TIMING = "tokens_per_s"


def _train_config(tiny_export, data, *overrides):
    return load_config(
        TrainConfig,
        "configs/tiny/train.yaml",
        [f"model={tiny_export}", f"data.path={data}", *STEPS, *overrides],
    )


def test_teacher_equal_to_the_student_gives_zero_kd(tiny_export, tiny_assets, tmp_path):
    cfg = _train_config(
        tiny_export, tiny_assets / "prepared", f"distill.teacher={tiny_export}", "distill.alpha=0.5"
    )
    run(cfg, tmp_path / "run", progress=False)
    first, *_, last = read_metrics(tmp_path / "run")
    assert first["kd_loss"] == pytest.approx(0.0, abs=1e-6)  # before the first update, teacher == student
    assert first["lm_loss"] == pytest.approx(0.5 * first["ce_loss"], rel=1e-6)
    assert last["kd_loss"] > 1e-4  # the student moved away from its frozen copy
    assert set(k for k in last if k.startswith("eval_kl/")) == {"eval_kl/code", "eval_kl/docs"}
    assert all(v >= 0 for k, v in last.items() if k.startswith("eval_kl/"))
    from sheared.report import write_report

    summary = write_report(tmp_path / "run")
    assert (summary.parent / "distillation.png").is_file() and "### distillation" in summary.read_text()


def test_alpha_zero_is_the_plain_loss(tiny_export, tiny_assets, tmp_path):
    data = tiny_assets / "prepared"
    run(_train_config(tiny_export, data), tmp_path / "plain", progress=False)
    run(
        _train_config(tiny_export, data, "distill.teacher=source", "distill.alpha=0"),
        tmp_path / "kd0",
        progress=False,
    )
    plain, kd0 = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "kd0")
    assert [r["lm_loss"] for r in plain] == [r["lm_loss"] for r in kd0]
    assert [r["lm_loss"] for r in kd0] == [r["ce_loss"] for r in kd0]
    assert all(r["kd_loss"] > 0 for r in kd0)  # the teacher (the unpruned source) differs from the student


class Crash(RuntimeError):
    pass


def test_resume_with_a_teacher_equals_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    overrides = ["distill.teacher=source", "distill.alpha=0.7", "distill.temperature=2.0", "distill.top_k=50"]
    overrides += [
        "train.steps=6",
        "train.save_interval=3",
        "train.eval_interval=3",
        "data.max_eval_sequences=2",
    ]
    run(tiny_config(*overrides), tmp_path / "full", progress=False)
    real_next = DomainMixtureSampler.next_global_batch

    def crash_at_step_4(self, size):
        if self.step == 4:
            raise Crash
        return real_next(self, size)

    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", crash_at_step_4)
    with pytest.raises(Crash):
        run(tiny_config(*overrides), tmp_path / "crashed", progress=False)
    monkeypatch.setattr(DomainMixtureSampler, "next_global_batch", real_next)
    run(tiny_config(*overrides), tmp_path / "crashed", resume=True, progress=False)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "crashed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k != TIMING} == {k: v for k, v in b.items() if k != TIMING}
    assert "kd_loss" in full[-1] and "eval_kl/code" in full[-1]


def test_teacher_of_another_tokenizer_is_refused(tiny_assets, tiny_config, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_assets / "source", other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(other)
    cfg = tiny_config()
    argv = ["prune", "--config", "configs/tiny/prune.yaml", "--run-dir", str(tmp_path / "run")]
    argv += [f"source={cfg.source}", f"data.path={cfg.data.path}", "data.auto_prepare=null"]
    assert main([*argv, f"distill.teacher={other}"]) == 2
    err = capsys.readouterr().err
    assert "has another tokenizer" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written
