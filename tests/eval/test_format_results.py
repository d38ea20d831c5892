"""`sheared eval`'s tables: every column as wide as its longest name, nothing cut, columns aligned."""

from __future__ import annotations

from sheared.eval.evaluate import format_results, model_names
from sheared.eval.table import text_table

# Display names as `model_names` makes them from export folders: longer than any fixed width.
SPECS = ["runs/demo/smollm2-135m", "runs/demo/pruned-continued-plain", "runs/demo/pruned-continued-distilled"]
DOMAINS = {"code": 2.0, "encyclopedic-long-domain-name": 3.0}


def _results() -> dict:
    names = model_names(SPECS)
    domains = {
        n: {d: {"loss": v + i, "perplexity": 2.718 ** (v + i)} for d, v in DOMAINS.items()}
        for i, n in enumerate(names)
    }
    speeds = {
        n: {"forward_tokens_per_s": 1000.0 * (i + 1), "generate_tokens_per_s": 50.0 * (i + 1)}
        for i, n in enumerate(names)
    }
    settings = {
        "dtype": "float32",
        "batch_size": 4,
        "seq_len": 256,
        "new_tokens": 32,
        "prompt_len": 32,
        "rounds": 3,
    }
    return {"models": names, "domains": domains, "throughput": {"settings": settings, "results": speeds}}


def _table(lines: list[str], title: str) -> list[str]:
    """The lines of the table under `title`, up to the next blank line."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def test_long_model_and_domain_names_are_not_cut():
    lines = format_results(_results()).splitlines()
    perplexity = _table(lines, "per-domain perplexity")
    assert perplexity[0].split() == [
        "domain",
        "smollm2-135m",
        "pruned-continued-plain",
        "pruned-continued-distilled",
    ]
    assert perplexity[2].startswith("encyclopedic-long-domain-name  ")
    assert perplexity[3].split()[:2] == ["exp(mean", "loss)"]
    throughput = _table(lines, "throughput")
    header = [c.strip() for c in throughput[0].split("  ") if c.strip()]
    assert header == [
        "model",
        "forward tok/s",
        "min-max",
        "generate tok/s",
        "min-max",
        "fwd vs smollm2-135m",
        "gen vs smollm2-135m",
    ]
    assert throughput[3].split() == ["pruned-continued-distilled", "3000", "150.0", "3.00x", "3.00x"]
    for table in (perplexity, throughput):  # numbers right-aligned under their headers: one width
        assert len({len(line) for line in table}) == 1, table


def test_text_table_widths_fit_the_widest_cell():
    lines = text_table(["name", "n"], [["a-very-long-model-name", "1"], ["b", "12345"]], right={1}, rule=True)
    assert lines == [
        "name                        n",
        "----------------------  -----",
        "a-very-long-model-name      1",
        "b                       12345",
    ]
