"""Probe-table builder: hand-built inputs with known per-layer values, chunking and
masking invariances, table layout, drill-down detail."""

import math

import pandas as pd
import pytest
import torch

from workbench.errors import ConfigError, DataError, WorkbenchError
from workbench.measures import metrics
from workbench.measures.probing import (
    LENS_STAT_NAMES,
    ProbeInputs,
    attention_detail,
    compute_probe_metrics,
    per_position_detail,
)
from workbench.storage.schema import ATTN_COLUMNS, CELL_COLUMNS, METRIC_COLUMNS, TOPK_COLUMNS

LN3 = math.log(3.0)
P_FINAL = [0.1, 0.2, 0.7]


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def _jsd(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y) if a > 0)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _hand_inputs():
    """L = 3 layers, V = d = 3, identity readout, N = 2 sequences of T = 2.

    Scored positions: (seq 0, t 0) and (seq 1, t 1). At both, layer 1 is uniform and
    layers 2 and 3 are P_FINAL; targets are 2 and 0. The unscored positions hold
    garbage. Attention (H = 2): query 0 sees only key 0; at query 1 the final layer's
    heads are [0.2, 0.8] and [0.6, 0.4], layer 2 has the same heads swapped, layer 1
    is uniform.
    """
    garbage = torch.tensor([5.0, -3.0, 1.0])
    final = torch.tensor(P_FINAL).log()
    uniform = torch.zeros(3)
    hidden1 = torch.stack([torch.stack([uniform, garbage]), torch.stack([garbage, uniform])])
    hidden2 = torch.stack([torch.stack([final, garbage]), torch.stack([garbage, final])])
    final_logits = hidden2.clone()
    targets = torch.tensor([[2, -100], [-100, 0]])
    mask = torch.tensor([[True, False], [False, True]])

    def layer(rows_h0, rows_h1):  # query-1 rows of heads 0 and 1 -> (N=2, H=2, T=2, T=2)
        a = torch.zeros(2, 2, 2)
        a[:, 0, 0] = 1.0
        a[0, 1], a[1, 1] = torch.tensor(rows_h0), torch.tensor(rows_h1)
        return a.unsqueeze(0).repeat(2, 1, 1, 1)

    attentions = [
        layer([0.5, 0.5], [0.5, 0.5]),
        layer([0.6, 0.4], [0.2, 0.8]),
        layer([0.2, 0.8], [0.6, 0.4]),
    ]
    return ProbeInputs(
        hidden=[hidden1, hidden2],
        final_logits=final_logits,
        lens=lambda h, layer: h,
        targets=targets,
        mask=mask,
        attentions=attentions,
    )


def test_lens_metrics_of_hand_built_inputs():
    result = compute_probe_metrics(_hand_inputs())
    assert result.n_layers == 3 and result.n_positions == 2
    uniform = [1 / 3] * 3
    expected = {
        # layer 1 (uniform), layer 2 (== final), layer 3 (final)
        "lens_kl": [LN3 - _entropy(P_FINAL), 0.0, 0.0],
        "lens_js": [_jsd(uniform, P_FINAL), 0.0, 0.0],
        "top1_agree": [0.0, 1.0, 1.0],
        "final_rank": [0.0, 0.0, 0.0],  # uniform: every token ties for the top
        "target_rank": [0.0, 1.0, 1.0],  # targets 2 (rank 0) and 0 (rank 2)
        "target_nll": [LN3] + [(-math.log(0.7) - math.log(0.1)) / 2] * 2,
        "entropy": [LN3, _entropy(P_FINAL), _entropy(P_FINAL)],
    }
    for name, values in expected.items():
        assert result.lens[name].tolist() == pytest.approx(values, abs=1e-6), name
    assert result.prediction_depth == pytest.approx(2.0)


def test_attention_metrics_of_hand_built_inputs():
    result = compute_probe_metrics(_hand_inputs())
    # Two scored queries: query 0 (a single key: every JSD 0, entropy 0, bos 1) and
    # query 1, so every mean is half the query-1 value (plus 0.5 for bos).
    js_heads = _jsd([0.2, 0.8], [0.6, 0.4])
    js_uniform_final = _jsd([0.5, 0.5], [0.4, 0.6])
    expected_final = [js_uniform_final / 2, 0.0, 0.0]
    assert result.attn_js[:, 2].tolist() == pytest.approx(expected_final, abs=1e-6)
    # Layer 2 has the same head mean as the final layer.
    assert result.attn_js[0, 1] == pytest.approx(js_uniform_final / 2, abs=1e-6)
    assert result.attn_js_final_per_head[1].tolist() == pytest.approx([js_heads / 2] * 2, abs=1e-6)
    # Layer 1's heads are both uniform, so every matching costs the same.
    js_uniform_heads = (_jsd([0.5, 0.5], [0.2, 0.8]) + _jsd([0.5, 0.5], [0.6, 0.4])) / 2
    expected_match = [js_uniform_heads / 2, 0.0, 0.0]
    assert result.attn_head_match.tolist() == pytest.approx(expected_match, abs=1e-6)
    assert result.attn_head_identity[1] == pytest.approx(js_heads / 2, abs=1e-6)
    assert result.head_perm[1].tolist() == [1, 0] and result.head_perm[2].tolist() == [0, 1]
    assert result.attn_entropy[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert result.attn_entropy[2].tolist() == pytest.approx(
        [_entropy([0.2, 0.8]) / math.log(2) / 2, _entropy([0.6, 0.4]) / math.log(2) / 2], abs=1e-6
    )
    assert result.bos_mass[0].tolist() == pytest.approx([0.75, 0.75])
    assert result.bos_mass[2].tolist() == pytest.approx([0.6, 0.8])


def test_temperature_applies_to_every_layer():
    result = compute_probe_metrics(_hand_inputs(), temperature=2.0)
    tempered = torch.tensor(P_FINAL).log().div(2.0).softmax(-1).tolist()
    assert result.lens["entropy"][2] == pytest.approx(_entropy(tempered), abs=1e-6)
    assert result.lens["lens_kl"][0] == pytest.approx(LN3 - _entropy(tempered), abs=1e-6)


def _random_inputs(seed=0, n_seq=3, seq_len=7, d=8, vocab=13, n_layers=4, n_heads=2):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(d)
    unembed = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        unembed.weight.copy_(torch.randn(vocab, d, generator=g))

    def readout(h):
        return unembed(norm(h))

    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    shape = (n_seq, n_heads, seq_len, seq_len)
    scores = [torch.randn(shape, generator=g) * 3 for _ in range(n_layers)]
    attentions = [s.masked_fill(future, -math.inf).softmax(-1) for s in scores]
    mask = torch.rand(n_seq, seq_len, generator=g) > 0.4
    mask[0, -1] = True
    return ProbeInputs(
        hidden=[torch.randn(n_seq, seq_len, d, generator=g) for _ in range(n_layers - 1)],
        final_logits=torch.randn(n_seq, seq_len, vocab, generator=g) * 2,
        lens=lambda h, layer: readout(h),
        targets=torch.randint(0, vocab, (n_seq, seq_len), generator=g),
        mask=mask,
        attentions=attentions,
    )


def _assert_same_result(a, b, atol):
    for name in LENS_STAT_NAMES:
        torch.testing.assert_close(
            torch.tensor(a.lens[name]), torch.tensor(b.lens[name]), atol=atol, rtol=0
        )
    assert a.prediction_depth == pytest.approx(b.prediction_depth, abs=atol)
    for name in ("attn_js", "attn_js_final_per_head", "attn_entropy", "bos_mass", "attn_head_match",
                 "attn_head_identity", "head_perm"):
        torch.testing.assert_close(
            torch.tensor(getattr(a, name)), torch.tensor(getattr(b, name)), atol=atol, rtol=0
        )


def test_chunk_size_does_not_change_results():
    inputs = _random_inputs()
    one_at_a_time = compute_probe_metrics(inputs, chunk_size=1)
    all_at_once = compute_probe_metrics(inputs, chunk_size=1000)
    _assert_same_result(one_at_a_time, all_at_once, atol=1e-6)


@pytest.mark.parametrize("kind", ["logit", "affine"])
def test_layers_read_out_together_give_the_same_metrics(monkeypatch, kind):
    """Several layers' chunks go through one unembedding product (``readout_group``): the
    same statistics as one product per layer and chunk, with fewer products."""
    from workbench.measures import probing
    from workbench.models.readout import AffineLens, LogitLens

    inputs = _random_inputs(seed=3, n_layers=6)
    g = torch.Generator().manual_seed(5)
    norm, unembed = torch.nn.LayerNorm(8), torch.nn.Linear(8, 13, bias=False)
    products = []
    unembed.register_forward_hook(lambda module, args, out: products.append(out.shape[0]))
    lens = LogitLens(norm, unembed)
    if kind == "affine":
        lens = AffineLens(lens, {layer: (torch.randn(8, 8, generator=g) * 0.3, torch.randn(8, generator=g))
                                 for layer in (1, 3, 4)})
    inputs.lens = lens
    with torch.no_grad():
        grouped = compute_probe_metrics(inputs, chunk_size=4, detail_prompts=[0])
        n_grouped = len(products)
        products.clear()
        monkeypatch.setattr(probing, "readout_group", lambda rows: 1)
        alone = compute_probe_metrics(inputs, chunk_size=4, detail_prompts=[0])
    chunks = -(-int(inputs.mask.sum()) // 4)
    assert len(products) == chunks * 5 and n_grouped == chunks  # 5 intermediate layers, one product per chunk
    _assert_same_result(grouped, alone, atol=1e-6)
    for a, b in zip(grouped.detail[0], alone.detail[0]):
        pd.testing.assert_frame_equal(a, b, atol=1e-6, check_exact=False)


def test_unscored_positions_are_ignored():
    inputs = _random_inputs(seed=1)
    before = compute_probe_metrics(inputs)
    g = torch.Generator().manual_seed(99)
    off = ~inputs.mask
    for h in inputs.hidden:
        h[off] = torch.randn(int(off.sum()), h.shape[-1], generator=g) * 10
    vocab = inputs.final_logits.shape[-1]
    inputs.final_logits[off] = torch.randn(int(off.sum()), vocab, generator=g) * 10
    inputs.targets[off] = -100  # e.g. the ignore index: never looked up
    seq_len = inputs.mask.shape[1]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    for a in inputs.attentions:
        fresh = torch.randn(a.shape, generator=g).masked_fill(future, -math.inf).softmax(-1)
        # Only the query rows of unscored positions change (their keys stay, since
        # scored queries attend to them).
        a.copy_(torch.where(off[:, None, :, None], fresh, a))
    after = compute_probe_metrics(inputs)
    assert after.lens["lens_kl"].tolist() != pytest.approx([0.0] * 4)  # a non-trivial table
    _assert_same_result(before, after, atol=1e-6)


def test_padding_mask_sets_key_count_and_first_token():
    # One left-padded sequence: position 0 is padding; queries 2 and 3 are uniform
    # over the real keys they can see.
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 1, 1] = 1.0
    a[0, 0, 2, 1:3] = 0.5
    a[0, 0, 3, 1:4] = 1 / 3
    a[0, 0, 0, 0] = 1.0
    inputs = ProbeInputs(
        hidden=[torch.zeros(1, 4, 3)],
        final_logits=torch.zeros(1, 4, 3),
        lens=lambda h, layer: h,
        targets=torch.zeros(1, 4, dtype=torch.long),
        mask=torch.tensor([[False, False, True, True]]),
        attentions=[a, a],
        attention_mask=torch.tensor([[False, True, True, True]]),
    )
    result = compute_probe_metrics(inputs)
    assert result.attn_entropy.ravel().tolist() == pytest.approx([1.0, 1.0])
    assert result.bos_mass.ravel().tolist() == pytest.approx([(0.5 + 1 / 3) / 2] * 2)


def test_to_frame_layout():
    inputs = _random_inputs(seed=2)
    n_layers, n_heads = 4, 2
    result = compute_probe_metrics(inputs)
    frame = result.to_frame("run-a", 50, "reference", "probe")
    assert list(frame.columns) == METRIC_COLUMNS
    assert not frame.duplicated(["layer", "head", "ref_layer", "metric"]).any()
    per_layer_and_heads = n_layers * (n_heads + 1)
    assert frame["metric"].value_counts().to_dict() == {
        **{name: n_layers for name in LENS_STAT_NAMES},
        "prediction_depth": 1,
        "attn_js_final": per_layer_and_heads,
        "attn_js": n_layers * n_layers,
        "attn_entropy": per_layer_and_heads,
        "bos_mass": per_layer_and_heads,
        "attn_head_match": n_layers,
        "attn_head_identity": n_layers,
    }
    assert set(frame["run"]) == {"run-a"} and set(frame["step"]) == {50}
    assert set(frame["split"]) == {"reference"} and set(frame["source"]) == {"probe"}
    depth = frame[frame["metric"] == "prediction_depth"].iloc[0]
    assert (depth["layer"], depth["head"], depth["ref_layer"]) == (0, -1, -1)
    assert depth["value"] == pytest.approx(result.prediction_depth)
    match = frame[frame["metric"] == "attn_head_match"]
    assert set(match["ref_layer"]) == {n_layers} and set(match["layer"]) == {1, 2, 3, 4}
    js = frame.query(f"metric == 'attn_js' and layer == 2 and ref_layer == {n_layers}")
    js_final = frame.query("metric == 'attn_js_final' and layer == 2 and head == -1")
    assert js["value"].item() == pytest.approx(js_final["value"].item())
    entropy = frame.query("metric == 'attn_entropy' and layer == 1 and head == -1")
    entropy_mean = entropy["value"].item()
    assert entropy_mean == pytest.approx(result.attn_entropy[0].mean())
    assert frame.dtypes["layer"] == "int64" and frame.dtypes["value"] == "float64"

    lens_only = ProbeInputs(**{**inputs.__dict__, "attentions": None})
    lens_frame = compute_probe_metrics(lens_only).to_frame("r", 0, "greedy", "analyzer")
    assert len(lens_frame) == 7 * n_layers + 1
    no_match = compute_probe_metrics(inputs, head_match=False).to_frame("r", 0, "ref", "probe")
    assert "attn_head_match" not in set(no_match["metric"])


def test_per_position_detail_of_hand_built_inputs():
    inputs = _hand_inputs()
    inputs.input_ids = torch.tensor([[0, 1], [2, 1]])
    names = ["a", "b", "c"]
    topk, cells = per_position_detail(inputs, 1, top_k=2, decode=lambda i: names[i])
    assert list(topk.columns) == [c for c in TOPK_COLUMNS if c not in ("run", "step")]
    assert list(cells.columns) == [c for c in CELL_COLUMNS if c not in ("run", "step")]
    final_cell = topk[topk["layer"] == 3]
    assert final_cell["position"].tolist() == [1, 1]  # only the scored position of prompt 1
    assert final_cell["token_id"].tolist() == [2, 1] and final_cell["token"].tolist() == ["c", "b"]
    assert final_cell["prob"].tolist() == pytest.approx([0.7, 0.2])
    assert topk[topk["layer"] == 1]["prob"].tolist() == pytest.approx([1 / 3, 1 / 3])
    by_key = cells.set_index(["layer", "metric"])["value"]
    assert by_key[(1, "target_nll")] == pytest.approx(LN3)
    assert by_key[(3, "target_rank")] == 2.0  # target 0 has p = 0.1
    assert by_key[(0, "prediction_depth")] == 2.0
    assert set(cells["token"]) == {"b"} and set(cells["target"]) == {"a"}
    assert len(cells) == 3 * len(LENS_STAT_NAMES) + 1


def test_per_position_detail_cells_average_to_the_table():
    inputs = _random_inputs(seed=3)
    result = compute_probe_metrics(inputs)
    cells = pd.concat([per_position_detail(inputs, i, chunk_size=2)[1] for i in range(3)])
    assert cells["token"].isna().all()  # no input_ids given
    means = cells.groupby(["layer", "metric"])["value"].mean()
    for name in LENS_STAT_NAMES:
        per_layer = [means[(layer, name)] for layer in range(1, 5)]
        assert per_layer == pytest.approx(result.lens[name].tolist(), abs=1e-6)
    assert means[(0, "prediction_depth")] == pytest.approx(result.prediction_depth)


def test_drill_down_comes_from_the_lens_pass_itself():
    # compute_probe_metrics(detail_prompts=...) collects each prompt's drill-down from the
    # one read-out pass over every scored position; it equals per_position_detail, which
    # reads the prompt out on its own, for chunks that cut across prompts (chunk_size=2)
    # and for prompts with no scored position.
    inputs = _random_inputs(seed=3)
    inputs.mask[1] = False  # prompt 1 scores nothing
    names = [f"t{i}" for i in range(inputs.final_logits.shape[-1])]
    result = compute_probe_metrics(inputs, chunk_size=2, detail_prompts=[0, 1, 2], top_k=3,
                                   decode=lambda i: names[i])
    assert set(result.detail) == {0, 1, 2}
    for prompt in (0, 1, 2):
        topk, cells = result.detail[prompt]
        alone_topk, alone_cells = per_position_detail(inputs, prompt, top_k=3, chunk_size=5,
                                                      decode=lambda i: names[i])
        pd.testing.assert_frame_equal(topk, alone_topk, atol=1e-6, check_exact=False)
        pd.testing.assert_frame_equal(cells, alone_cells, atol=1e-6, check_exact=False)
    assert len(result.detail[1][0]) == 0 and len(result.detail[2][0]) > 0
    plain = compute_probe_metrics(inputs, chunk_size=2)
    assert plain.detail == {}
    for name in LENS_STAT_NAMES:
        assert result.lens[name].tolist() == plain.lens[name].tolist()  # the same pass, bit for bit
    with pytest.raises(WorkbenchError, match="out of range"):
        compute_probe_metrics(inputs, detail_prompts=[7])


def test_attention_detail_rows():
    inputs = _hand_inputs()
    frame = attention_detail(inputs.attentions, 1)
    assert list(frame.columns) == [c for c in ATTN_COLUMNS if c not in ("run", "step")]
    # 3 layers x (mean + 2 heads) x 3 causal (query, key) pairs of a length-2 sequence.
    assert len(frame) == 3 * 3 * 3
    weight = frame.set_index(["layer", "head", "query", "key"])["weight"]
    assert weight[(3, 0, 1, 1)] == pytest.approx(0.8)
    assert weight[(3, -1, 1, 0)] == pytest.approx(0.4)
    assert weight[(1, -1, 0, 0)] == pytest.approx(1.0)
    only_last = attention_detail(inputs.attentions, 1, query_mask=torch.tensor([False, True]))
    assert set(only_last["query"]) == {1} and len(only_last) == 3 * 3 * 2
    unpadded = attention_detail(inputs.attentions, 0, attention_mask=torch.tensor([False, True]))
    assert set(unpadded["key"]) == {1}


def test_bad_inputs_raise_one_line_errors():
    inputs = _hand_inputs()
    with pytest.raises(WorkbenchError, match=r"hidden\[0\]"):
        ProbeInputs(**{**inputs.__dict__, "hidden": [torch.zeros(2, 3, 3), inputs.hidden[1]]})
    with pytest.raises(WorkbenchError, match="attentions must hold one tensor per layer"):
        ProbeInputs(**{**inputs.__dict__, "attentions": inputs.attentions[:2]})
    with pytest.raises(DataError, match="no positions"):
        no_positions = torch.zeros(2, 2, dtype=torch.bool)
        compute_probe_metrics(ProbeInputs(**{**inputs.__dict__, "mask": no_positions}))
    bad_targets = inputs.targets.clone()
    bad_targets[0, 0] = 3
    with pytest.raises(DataError, match="outside the vocabulary"):
        compute_probe_metrics(ProbeInputs(**{**inputs.__dict__, "targets": bad_targets}))
    with pytest.raises(ConfigError, match="chunk_size"):
        compute_probe_metrics(inputs, chunk_size=0)
    with pytest.raises(WorkbenchError, match="prompt_index 5"):
        per_position_detail(inputs, 5)


def test_metrics_module_is_the_one_used():
    # The head-averaged attention JSD in the table is metrics.attn_js averaged over queries.
    inputs = _random_inputs(seed=4, n_seq=1)
    result = compute_probe_metrics(inputs)
    queries = inputs.mask[0].nonzero().squeeze(1)
    rows = [a[0][:, queries] for a in inputs.attentions]
    expected = metrics.attn_js(rows[0], rows[3]).mean().item()
    assert result.attn_js[0, 3] == pytest.approx(expected, abs=1e-6)


def _per_sequence_attention(inputs):
    """The attention metrics computed one sequence at a time (the obvious loop)."""
    n_layers, n_seq = len(inputs.attentions), inputs.mask.shape[0]
    seq_len = inputs.mask.shape[1]
    js, js_head, ent, bos, cost, count = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for i in range(n_seq):
        queries = inputs.mask[i].nonzero().squeeze(1)
        if queries.numel() == 0:
            continue
        valid = None if inputs.attention_mask is None else inputs.attention_mask[i]
        key_mask = metrics.causal_key_mask(queries, seq_len, valid)
        first = 0 if valid is None else int(valid.long().argmax())
        rows = [a[i][:, queries] for a in inputs.attentions]
        js = js + metrics.attn_js_matrix(rows).sum(-1)
        js_head = js_head + torch.stack([metrics.attn_js_per_head(r, rows[-1]) for r in rows]).sum(-1)
        ent = ent + torch.stack([metrics.attn_entropy(r, key_mask) for r in rows]).sum(-1)
        bos = bos + torch.stack([metrics.bos_mass(r, first) for r in rows]).sum(-1)
        cost = cost + torch.stack([metrics.head_js_matrix(r, rows[-1]) for r in rows]).sum(-1)
        count += queries.numel()
    assert n_layers == len(rows)
    return {"attn_js": js / count, "attn_js_final_per_head": js_head / count,
            "attn_entropy": ent / count, "bos_mass": bos / count}, cost / count


def test_batched_attention_equals_the_per_sequence_loop():
    inputs = _random_inputs(seed=5, n_seq=4, seq_len=9, n_heads=3)
    padding = torch.ones(4, 9, dtype=torch.bool)
    padding[1, :3] = padding[2, :1] = False  # left padding: first real token moves
    inputs.attention_mask = padding
    inputs.mask[3] = False  # a sequence with nothing scored
    inputs.mask[1, :3] = False
    result = compute_probe_metrics(inputs)
    expected, cost = _per_sequence_attention(inputs)
    for name, value in expected.items():
        torch.testing.assert_close(
            torch.tensor(getattr(result, name)), value.double(), atol=1e-6, rtol=0, msg=name
        )
    for layer in range(len(inputs.attentions)):
        perm, matched, identity = metrics.match_heads(cost[layer])
        assert result.head_perm[layer].tolist() == perm.tolist()
        assert result.attn_head_match[layer] == pytest.approx(matched, abs=1e-6)
        assert result.attn_head_identity[layer] == pytest.approx(identity, abs=1e-6)


def test_default_chunk_equals_one_position_at_a_time():
    inputs = _random_inputs(seed=6)
    _assert_same_result(
        compute_probe_metrics(inputs), compute_probe_metrics(inputs, chunk_size=1), atol=1e-6
    )
    one = per_position_detail(inputs, 0, chunk_size=1)[1]
    default = per_position_detail(inputs, 0)[1]
    pd.testing.assert_frame_equal(one, default, atol=1e-6, check_exact=False)


def test_attention_detail_top_k_keeps_the_heaviest_keys_and_their_mass():
    # One sequence of 4 tokens, one layer, two heads; query 3 sees keys 0..3.
    a = torch.zeros(1, 2, 4, 4)
    a[0, :, 0, 0] = 1.0
    a[0, 0, 1, :2] = torch.tensor([0.3, 0.7])
    a[0, 1, 1, :2] = torch.tensor([0.9, 0.1])
    a[0, 0, 2, :3] = torch.tensor([0.5, 0.2, 0.3])
    a[0, 1, 2, :3] = torch.tensor([0.1, 0.1, 0.8])
    a[0, 0, 3] = torch.tensor([0.1, 0.4, 0.2, 0.3])
    a[0, 1, 3] = torch.tensor([0.6, 0.1, 0.2, 0.1])
    full = attention_detail([a], 0, with_mass=True)
    assert len(full) == 3 * (1 + 2 + 3 + 4) and (full["mass"] == 1.0).all()
    top = attention_detail([a], 0, top_k=2, with_mass=True)
    # 3 head rows (mean, 0, 1) x (1 + 2 + 2 + 2) kept pairs: query 0 has one visible key.
    assert len(top) == 3 * 7
    w = top.set_index(["head", "query", "key"])["weight"]
    assert set(top[(top["head"] == 0) & (top["query"] == 3)]["key"]) == {1, 3}  # 0.4 and 0.3
    assert w[(0, 2, 0)] == pytest.approx(0.5) and w[(0, 2, 2)] == pytest.approx(0.3)
    # Mean over heads at query 3: (0.35, 0.25, 0.2, 0.2): keys 0 and 1, mass 0.6.
    mean3 = top[(top["head"] == -1) & (top["query"] == 3)]
    assert set(mean3["key"]) == {0, 1} and mean3["mass"].tolist() == pytest.approx([0.6, 0.6])
    assert top[(top["head"] == 1) & (top["query"] == 2)]["mass"].tolist() == pytest.approx([0.9, 0.9])
    # top_k at least the widest row keeps everything, exactly as without it.
    pd.testing.assert_frame_equal(attention_detail([a], 0, top_k=4, with_mass=True), full)
    assert "mass" not in attention_detail([a], 0, top_k=2).columns
    with pytest.raises(ConfigError, match="top_k"):
        attention_detail([a], 0, top_k=0)
