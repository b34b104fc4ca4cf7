"""A decoder's fidelity budget is on what its user sees, the greedy next token (issue 16, "never trade answers
silently"): loss = 1 - next-token agreement over every real prompt position, perplexity reported beside it and
never budgeted on; a codec measured by perplexity alone (older profiles) counts as unmeasured, and the plan
says so. Real components: a random llama-tiny split over 2 loopback ranks, the profile's row selection, the
planner."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.eval_sets import synthetic_set
from edgeprism.evaluate.fidelity import evaluate
from edgeprism.models.config import get_config
from edgeprism.plan import Limits, Request, choose_plan, codec_exclusion
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.plan.types import LinkEstimate
from edgeprism.profile.fidelity import codec_entries, select_rows
from edgeprism.profile.profiler import ProfileOptions, fidelity_entries
from edgeprism.profile.schema import Profile

CODECS = ("fp16", "int8", "int4")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Rows of `edgeprism eval`'s decoder set for llama-tiny (random weights: near-uniform next-token
    probabilities, where int4 moves perplexity by ~0.02 % yet flips ~2 % of the greedy tokens)."""
    (eval_set,) = synthetic_set("llama-tiny")
    return [r.to_dict() for r in evaluate(eval_set, list(CODECS), world_size=2)]


def _row(rows: list[dict], codec: str, metric: str) -> dict:
    return next(r for r in rows if r["codec"] == codec and r["metric"] == metric)


def _profile(rows: list[dict]) -> Profile:
    """llama-tiny over 2 devices on a fast link, fidelity from `rows` as `edgeprism profile --fidelity` takes it.
    The compute is scaled so that splitting pays and int4, the lightest wire, is the fastest plan."""
    base = synthetic_profile("llama-tiny", bandwidth_bps=20e6, latency_s=1e-4, seconds_per_image=200.0)
    config = base.model
    entries = codec_entries([get_codec(name) for name in CODECS], config.exchange_width,
                            select_rows(rows, config.name, 2), num_layers=config.num_layers)
    return dataclasses.replace(base, codecs=entries)


def _plan(profile: Profile, limits: Limits = Limits()):
    link = LinkEstimate(profile.link.bandwidth_bps, profile.link.latency_s)
    return choose_plan(profile, Request("llama-tiny", 1, 1024), link, limits=limits)


def test_decoder_rows_report_agreement_with_near_ties_and_perplexity(rows):
    assert {r["metric"] for r in rows} == {"next_token_agreement", "perplexity", "label_shift"}
    assert _row(rows, "int4", "label_shift")["value"] > _row(rows, "fp16", "label_shift")["value"]
    agreement = _row(rows, "int4", "next_token_agreement")
    assert agreement["items"] == 4 * 2 * 31  # every real position that has a next token: 4 batches of 2 x 32
    assert 0 <= agreement["near_ties"] <= agreement["items"]
    assert agreement["loss"] == pytest.approx(1 - agreement["value"])
    assert "near_ties" not in _row(rows, "int4", "perplexity")
    assert _row(rows, "fp16", "next_token_agreement")["value"] == 1.0


def test_tiny_perplexity_loss_does_not_admit_a_codec_that_flips_greedy_tokens(rows):
    agreement, perplexity = _row(rows, "int4", "next_token_agreement"), _row(rows, "int4", "perplexity")
    assert perplexity["loss"] < 0.001 and agreement["value"] < 0.99  # the case the budget must catch
    profile = _profile(rows)
    int4 = profile.codec("int4")
    assert int4.metric == "next_token_agreement" and int4.fidelity_loss == pytest.approx(1 - agreement["value"])
    assert "next_token_agreement loss" in (codec_exclusion(int4, Limits()) or "")
    plan = _plan(profile)
    assert plan.mode == "distributed" and plan.codec != "int4" and plan.fidelity_loss <= 0.01
    assert _plan(profile, Limits(max_fidelity_loss=None)).codec == "int4"  # the fastest: only the budget refused it


def test_agreement_row_is_kept_even_where_perplexity_loses_more(rows):
    worse_perplexity = [dict(r, loss=0.5, value=2 * r["reference_value"]) if r["metric"] == "perplexity" else r
                        for r in rows]
    chosen = select_rows(worse_perplexity, "llama-tiny", 2)
    assert {r["metric"] for r in chosen.values()} == {"next_token_agreement"}


def test_a_perplexity_only_profile_counts_as_unmeasured_and_the_plan_says_why(rows):
    old = [r for r in rows if r["metric"] == "perplexity"]  # what profiles held before agreement was measured
    profile = _profile(old)
    int4 = profile.codec("int4")
    assert int4.metric == "perplexity" and int4.loss is not None and int4.loss < 0.01
    assert int4.fidelity_loss is None and int4.report_only_metric == "perplexity"
    assert profile.codec("fp16").fidelity_loss == 0.0  # a lossless wire stays exact whatever measured it
    assert "measured by perplexity only" in (codec_exclusion(int4, Limits()) or "")
    plan = _plan(profile)
    assert plan.codec not in ("int4", "int8")
    assert "int4 (perplexity)" in plan.reason and "int8 (perplexity)" in plan.reason
    opted_in = _plan(profile, Limits(allow_unmeasured_codecs=True))
    assert opted_in.codec == "int4" and opted_in.fidelity_loss is None  # an opt-in, and the plan says unmeasured


def test_profile_note_names_codecs_measured_by_perplexity_only(rows, tmp_path):
    """What `edgeprism profile --fidelity FILE` records from an old perplexity-only file: the note says which
    codecs the planner will count as unmeasured (the lossless ones stay exact)."""
    path = tmp_path / "old.rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["metric"] == "perplexity"))
    options = ProfileOptions("llama-tiny", codecs=CODECS, fidelity_file=str(path))
    entries, note = fidelity_entries(options, get_config("llama-tiny"), [get_codec(n) for n in CODECS],
                                     lambda message: None)
    assert "measured only by a metric no budget applies to: int8 (perplexity), int4 (perplexity)" in note
    assert [e.fidelity_loss for e in entries] == [0.0, None, None]  # fp16 exact, int8 and int4 unmeasured
