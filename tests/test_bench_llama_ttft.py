"""scripts/bench_llama_ttft.py: its table is drawn from the rows alone (ratios to our one device per link and
length, medians and spreads, the plans' measured fidelity loss, first-token agreement), its rows say whether the
first token equalled one device's, its planner runs under the default budget, and its prompts are exactly N
tokens of real text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_llama_ttft.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_llama_ttft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(bench, strategy, n, repeat, ttft, first=7, total=None, link="wifi4", loss=0.0):
    return {"strategy": strategy, "num_tokens": n, "repeat": repeat, "ttft_s": ttft, "first_token": first,
            "ttft_plus_decode_s": total, "decode_tokens": 10 if total else 0, "link": link,
            "emulation": f"{link} (x)", "profile": "p.json", "fidelity_loss": loss,
            "load_average_1m": 1.0, "plan": "local" if strategy == bench.LOCAL else "fp16 x2"}


def test_table_ratios_spreads_and_agreement(bench):
    rows = [_row(bench, bench.LOCAL, 512, r, t, total=t + 1) for r, t in enumerate((4.0, 5.0, 6.0))]
    rows += [_row(bench, "ours 2 devices fp16", 512, r, t, first=7 if r else 9, total=d)  # one noisy pair: 1.9 < 2.0
             for r, (t, d) in enumerate(((2.0, 1.9), (2.5, 4.5), (3.5, 5.0)))]
    rows += [_row(bench, bench.LOCAL, 512, 0, 1.0, link="lan"), _row(bench, bench.PLANNER, 512, 0, 0.5, link="lan"),
             _row(bench, bench.LOCAL, 512, 1, 1.0, link="lan"), _row(bench, bench.PLANNER, 512, 1, 0.6, link="lan",
                                                                   loss=0.0053)]
    peer = _row(bench, bench.HF, 512, 0, 1.1, link="lan")
    del peer["fidelity_loss"]  # the 1-core peers are not our plans: no fidelity of ours to carry
    text = bench.table(rows + [peer])
    lan, wifi4 = text[text.index("## lan"):text.index("## wifi4")], text[text.index("## wifi4"):]
    assert "| ours 1 device | 5.00 (4.00-6.00) | 1.00 | 10.0 | local | 0.00% | 3/3 |" in wifi4
    assert "| ours 2 devices fp16 | 2.50 (2.00-3.50) | 0.50 | 5.0 | fp16 x2 | 0.00% | 2/3 |" in wifi4
    assert "| ours 2 devices planner | 0.55 (0.50-0.60) | 0.55 | - | fp16 x2 | 0.53% | 2/2 |" in lan
    assert "| transformers 1 core | 1.10 (1.10-1.10) | 1.10 | - | fp16 x2 | - | 1/1 |" in lan
    rows[-1]["fidelity_loss"] = None  # an opted-in codec of unmeasured fidelity says so
    assert "| 0.55 | - | fp16 x2 | unmeasured | 2/2 |" in bench.table(rows)


def test_rows_say_whether_the_first_token_equalled_one_device(bench):
    rows = [_row(bench, bench.LOCAL, 512, 0, 4.0), _row(bench, bench.PLANNER, 512, 0, 2.0, first=9),
            _row(bench, bench.PLANNER, 512, 1, 2.0), _row(bench, bench.LOCAL, 512, 1, 4.0)]
    rows.append(_row(bench, bench.PLANNER, 1024, 0, 2.0))  # no one-device row of that length
    bench.mark_first_tokens(rows)
    assert [r["first_token_equals_one_device"] for r in rows] == [True, False, True, True, None]


def test_planner_runs_under_the_default_fidelity_budget(bench):
    from edgeprism.plan.types import DEFAULT_MAX_FIDELITY_LOSS

    assert bench.parse_args(["--out", "x"]).max_fidelity_loss == DEFAULT_MAX_FIDELITY_LOSS


def test_prompts_are_exactly_n_tokens_of_the_plays(bench):
    class Words:  # a tokenizer: one id per word
        @staticmethod
        def encode(text):
            return type("E", (), {"ids": tuple(range(len(text.split())))})()

    assert len(bench.prompt_ids(Words(), 300)) == 300
    with pytest.raises(ValueError, match="tokens; 100000000 asked"):
        bench.prompt_ids(Words(), 100_000_000)
