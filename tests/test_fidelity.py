"""The fidelity harness: full exchange is exact, compression costs bytes and fidelity as measured."""

import json

import pytest
import torch

from edgeprism.cli.main import main
from edgeprism.comm.loopback import LoopbackGroup
from edgeprism.compress.registry import get_codec
from edgeprism.evaluate.eval_sets import synthetic_set
from edgeprism.evaluate.fidelity import evaluate, run_distributed
from edgeprism.models.loading import build_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.partition.transform import DEFAULT_MICRO_BATCHES


@pytest.mark.parametrize("name", ["vit-tiny-test", "bert-tiny-test", "gpt2-tiny-test"])
def test_loopback_transport_full_exchange_is_exact(name):
    model = build_model(name, seed=3)
    batch = synthetic_inputs(model.config, 3, seq_len=21, padded=name.startswith("bert"), seed=2)
    (outputs,), _ = run_distributed(model, [batch], get_codec("fp32"), 3, (0.5, 0.3, 0.2), gather_hidden=True)
    with torch.no_grad():
        reference = model(batch)
    assert max(float((outputs[k] - reference[k]).abs().max()) for k in outputs) <= 1e-5


def test_segment_means_moves_fewer_bytes_and_changes_the_answer():
    model = build_model("bert-tiny-test", seed=3)
    batch = synthetic_inputs(model.config, 2, seq_len=32, seed=2)
    with torch.no_grad():
        reference = model(batch)
    full, full_bytes = run_distributed(model, [batch], get_codec("fp32"), 2)
    means, means_bytes = run_distributed(model, [batch], get_codec("sm8"), 2)
    assert means_bytes < full_bytes / 6
    assert float((means[0]["mean"] - reference["mean"]).abs().max()) > 1e-4  # lossy, and measurably so
    assert float((full[0]["mean"] - reference["mean"]).abs().max()) <= 1e-5


def test_causal_means_flow_only_forward():
    model = build_model("gpt2-tiny-test", seed=3)
    batch = synthetic_inputs(model.config, 1, seq_len=30, seed=2)

    def rank_fn(ctx, exchanger):
        from edgeprism.partition.transform import PositionWise

        PositionWise(model, ctx, get_codec("sm2"), exchanger=exchanger).forward(batch if ctx.is_root else None)
        return exchanger.stats.per_kind_nbytes.get("layer", 0)

    sent = LoopbackGroup(3).run(rank_fn)
    assert sent[2] == 0 and sent[0] > 0 and sent[1] > 0  # the last rank's means would reach nobody


def test_rank_with_other_settings_is_refused_on_every_rank():
    model = build_model("bert-tiny-test", seed=3)

    def rank_fn(ctx, exchanger):
        from edgeprism.partition.transform import PositionWise

        codec = get_codec("sm4" if ctx.group_rank == 1 else "sm8")
        PositionWise(model, ctx, codec, exchanger=exchanger).verify_peers()

    with pytest.raises(ValueError, match="differ from rank"):
        LoopbackGroup(2).run(rank_fn)


def test_eval_rows_on_a_synthetic_set():
    (eval_set,) = synthetic_set("gpt2-tiny-test", batches=2)
    rows = evaluate(eval_set, ["sm1", "sm4", "fp16"], world_size=2)
    by_codec = {r.codec: r for r in rows if r.metric != "label_shift"}  # the reported shift has reference 0
    assert by_codec["sm1"].value == pytest.approx(by_codec["sm1"].reference_value, rel=1e-5)
    shifts = {r.codec: r.value for r in rows if r.metric == "label_shift"}
    assert shifts["sm1"] < 1e-6 < shifts["sm4"]  # CR = 1 is exact; Segment Means moves next-token probabilities
    assert by_codec["fp16"].bytes_per_request < by_codec["sm1"].bytes_per_request
    assert by_codec["sm4"].bytes_per_request < by_codec["fp16"].bytes_per_request


def test_eval_cli_json_and_bad_cr(capsys):
    assert main(["eval", "--model", "bert-tiny-test", "--cr", "1,4", "--world-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["cr"] for r in report["rows"]} == {1, 4}
    for key in ("cr", "metric", "value", "reference_value", "bytes_per_request", "codec"):
        assert key in report["rows"][0]
    with pytest.raises(SystemExit):
        main(["eval", "--model", "bert-tiny-test", "--cr", "0"])
    assert main(["eval", "--model", "bert-tiny-test", "--codec", "int8+sm4"]) == 2
    assert "sm4+int8" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["delta:lb8o4:lb3o4r", "delta:lb4o4r:lb3o2r", "lb3o4r", "int8"])
def test_profile_entry_and_plan_bytes_equal_what_a_request_sends(name):
    """Profile entry bytes × layers, `exchange_cost` and the planner's wire bytes all equal the layer bytes
    the loopback transport counts — for delta codecs too (key frame at layer 0, residuals after)."""
    from edgeprism.plan.accounting import exchange_cost
    from edgeprism.plan.cost import distributed_terms
    from edgeprism.plan.synthetic import synthetic_profile
    from edgeprism.profile.fidelity import codec_entries

    model = build_model("bert-tiny-test", seed=3)
    # One row: a low-bit format's 2-byte width field is per message, which the entry charges per row.
    config, world, tokens_per_rank, rows = model.config, 2, 16, 1
    batch = synthetic_inputs(config, rows, seq_len=world * tokens_per_rank, seed=2)
    codec = get_codec(name)
    _, measured = run_distributed(model, [batch], codec, world)  # all ranks' layer bytes of one request

    (entry,) = codec_entries([codec], config.hidden_size, num_layers=config.num_layers)
    per_layer = rows * (entry.wire_bytes_per_row + tokens_per_rank * entry.wire_bytes_per_token)
    assert world * per_layer * config.num_layers == pytest.approx(measured, abs=1e-6)
    assert exchange_cost(config, (tokens_per_rank,) * world, codec, batch=rows).bytes_per_request == measured

    # The planner charges the same bytes: fp32 and this codec differ by exactly the measured difference.
    (fp32,) = codec_entries([get_codec("fp32")], config.hidden_size, num_layers=config.num_layers)
    _, fp32_measured = run_distributed(model, [batch], get_codec("fp32"), world)
    profile = synthetic_profile("bert-tiny-test", world_size=world)
    wire = [distributed_terms(profile, rows, (1.0, 1.0), (tokens_per_rank,) * world, e, 50e6, 3e-3)[5]
            for e in (entry, fp32)]
    # 2 ranks: the busiest receiver gets the other rank's messages, i.e. half of what both send
    assert wire[0] - wire[1] == pytest.approx((measured - fp32_measured) / world, abs=1e-6)
    if name.startswith("delta:"):  # the key frame alone would over-charge: the fix is visible
        assert world * codec.nbytes(rows, tokens_per_rank, config.hidden_size) * config.num_layers > measured


def test_stateful_codec_entry_needs_the_layer_count():
    from edgeprism.profile.schema import CodecFidelity

    with pytest.raises(ValueError, match="num_layers"):
        CodecFidelity.from_codec(get_codec("delta:lb4o4r:lb3o4r"), 384)
    plain = CodecFidelity.from_codec(get_codec("int8"), 384)
    assert CodecFidelity.from_codec(get_codec("int8"), 384, num_layers=6) == plain


def test_eval_bytes_per_request_are_measured_bytes():
    """`edgeprism eval` rows carry the bytes the transport counted (delta: key frame + residuals), not nbytes."""
    from edgeprism.plan.accounting import exchange_cost

    (eval_set,) = synthetic_set("bert-tiny-test", batches=2)  # 2 batches of 2 rows, 32 tokens: 16 per rank
    config = eval_set.model.config
    rows = {r.codec: r for r in evaluate(eval_set, ["delta:lb4o4r:lb3o4r", "fp32"], world_size=2)}
    slices = min(DEFAULT_MICRO_BATCHES, 2)  # the split runs the 2 rows as this many micro-batches, each its messages
    for name, row in rows.items():
        per_slice = exchange_cost(config, (16, 16), name, batch=2 // slices).bytes_per_request
        assert row.bytes_per_request == per_slice * slices / 2  # per request row
    assert rows["fp32"].traffic_vs_fp32 == 1.0
    assert rows["delta:lb4o4r:lb3o4r"].traffic_vs_fp32 == pytest.approx(
        rows["delta:lb4o4r:lb3o4r"].bytes_per_request / rows["fp32"].bytes_per_request)
