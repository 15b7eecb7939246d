"""Metric definitions checked against values computed by hand."""

import math

import pytest
import torch

from workbench.measures import metrics

LN2 = math.log(2.0)


def _log(p):
    return torch.tensor(p, dtype=torch.float32).log()


def _causal_attention(n_heads, seq_len, generator, sharpness=3.0):
    """Random causal attention probabilities (H, T, T), rows summing to 1 over keys <= query."""
    scores = torch.randn(n_heads, seq_len, seq_len, generator=generator) * sharpness
    future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


# --- masked mean ----------------------------------------------------------------


def test_masked_mean_ignores_masked_values_even_nan():
    values = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    mask = torch.tensor([True, True, True, False])
    assert metrics.masked_mean(values, mask).item() == pytest.approx(2.0)


def test_masked_mean_along_dim_and_empty_is_nan():
    values = torch.tensor([[1.0, 5.0], [3.0, 7.0]])
    mask = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(metrics.masked_mean(values, mask, dim=1), torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(metrics.masked_mean(values, None, dim=0), torch.tensor([2.0, 6.0]))
    assert math.isnan(metrics.masked_mean(values, torch.zeros(2, 2, dtype=torch.bool)).item())


# --- logit lens per position ---------------------------------------------------


def test_lens_kl_is_final_layer_first():
    p_final, p_layer = [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]
    stats = metrics.lens_position_stats(_log([p_layer]), _log([p_final]), torch.tensor([0]))
    # KL(p^L || p^l) by hand, and the other direction for contrast.
    expected = 0.9 * math.log(0.9 / 0.3) + 0.05 * math.log(0.05 / 0.3) + 0.05 * math.log(0.05 / 0.4)
    reverse = 0.3 * math.log(0.3 / 0.9) + 0.3 * math.log(0.3 / 0.05) + 0.4 * math.log(0.4 / 0.05)
    assert stats["lens_kl"].item() == pytest.approx(expected, abs=1e-6)
    assert abs(expected - reverse) > 0.1  # the example really tells the directions apart


def test_lens_js_identical_zero_and_disjoint_ln2():
    p = _log([[0.5, 0.3, 0.2]])
    same = metrics.lens_position_stats(p, p, torch.tensor([0]))
    assert same["lens_js"].item() == pytest.approx(0.0, abs=1e-7)
    assert same["lens_kl"].item() == pytest.approx(0.0, abs=1e-7)
    disjoint = metrics.lens_position_stats(
        _log([[1.0, 0.0]]), _log([[0.0, 1.0]]), torch.tensor([1])
    )
    assert disjoint["lens_js"].item() == pytest.approx(LN2, abs=1e-6)
    assert disjoint["lens_kl"].item() == math.inf  # p^L puts mass where p^l has none


def test_ranks_nll_entropy_top1_by_hand():
    p_layer = [0.1, 0.4, 0.3, 0.2]
    p_final = [0.1, 0.1, 0.1, 0.7]  # top-1 of the final layer: token 3
    stats = metrics.lens_position_stats(_log([p_layer]), _log([p_final]), torch.tensor([0]))
    assert stats["final_rank"].item() == 2  # 0.4 and 0.3 beat 0.2
    assert stats["target_rank"].item() == 3  # target 0 (p=0.1) is last
    assert stats["target_nll"].item() == pytest.approx(-math.log(0.1), abs=1e-6)
    expected_entropy = -sum(p * math.log(p) for p in p_layer)
    assert stats["entropy"].item() == pytest.approx(expected_entropy, abs=1e-6)
    assert stats["top1_agree"].item() == 0.0


def test_top1_agree_is_argmax_equality_ties_included():
    """top1_agree is computed without an argmax pass (counts against the final top-1's
    score): it must still equal ``argmax p^l == argmax p^L``, first index on ties."""
    uniform = _log([[0.25] * 4] * 2)
    final = _log([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])  # top-1: token 0, token 3
    stats = metrics.lens_position_stats(uniform, final, torch.tensor([0, 0]))
    assert stats["top1_agree"].tolist() == [1.0, 0.0]  # a four-way tie: argmax is token 0
    gen = torch.Generator().manual_seed(0)
    # Logits on a coarse grid: many ties at the top, and rows where the top is unique.
    logits = torch.randint(0, 6, (400, 9), generator=gen).float()
    final = torch.randint(0, 6, (400, 9), generator=gen).float()
    stats = metrics.lens_position_stats(logits.log_softmax(-1), final.log_softmax(-1), torch.zeros(400, dtype=torch.long))
    expected = (logits.argmax(-1) == final.argmax(-1)).float()
    assert 0 < expected.sum() < 400
    assert torch.equal(stats["top1_agree"], expected)


def test_ranks_ties_share_the_better_rank():
    uniform = _log([[0.25] * 4])
    stats = metrics.lens_position_stats(uniform, _log([[0.1, 0.1, 0.1, 0.7]]), torch.tensor([2]))
    assert stats["final_rank"].item() == 0
    assert stats["target_rank"].item() == 0
    assert stats["entropy"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_lens_stats_at_final_layer_are_trivial():
    logp = torch.randn(6, 11).log_softmax(-1)
    stats = metrics.lens_position_stats(logp, logp, torch.arange(6))
    assert torch.all(stats["top1_agree"] == 1) and torch.all(stats["final_rank"] == 0)
    torch.testing.assert_close(stats["lens_kl"], torch.zeros(6))
    torch.testing.assert_close(stats["lens_js"], torch.zeros(6), atol=1e-6, rtol=0)


def test_prediction_depth_by_hand():
    # Rows: layers 1..4; columns: positions.
    argmax = torch.tensor(
        [
            [5, 1, 1, 5],
            [5, 5, 2, 1],
            [5, 2, 5, 5],
            [5, 5, 5, 5],
        ]
    )
    # pos0 every layer agrees -> 1; pos1 only layer 4 -> 4 (layer 2 agreeing does not
    # count, layer 3 breaks the run); pos2 layers 3..4 -> 3; pos3 layers 3..4 -> 3.
    assert metrics.prediction_depth(argmax == argmax[-1:]).tolist() == [1, 4, 3, 3]


# --- attention ------------------------------------------------------------------


def _one_hot_rows(n_heads, seq_len, key):
    """(H, T, T) with every query's weight on ``min(key, query)`` (causal)."""
    a = torch.zeros(n_heads, seq_len, seq_len)
    for q in range(seq_len):
        a[:, q, min(key, q)] = 1.0
    return a


def test_attn_js_identical_zero_disjoint_ln2():
    g = torch.Generator().manual_seed(0)
    a = _causal_attention(3, 5, g)
    torch.testing.assert_close(metrics.attn_js(a, a), torch.zeros(5), atol=1e-6, rtol=0)
    on_first, on_second = _one_hot_rows(2, 4, 0), _one_hot_rows(2, 4, 1)
    # Query 0 sees only key 0 in both maps; every later query is disjoint.
    torch.testing.assert_close(
        metrics.attn_js(on_first, on_second), torch.tensor([0.0, LN2, LN2, LN2])
    )
    torch.testing.assert_close(
        metrics.attn_js_per_head(on_first, on_second), torch.tensor([[0.0, LN2, LN2, LN2]] * 2)
    )


def test_attn_js_averages_heads_before_the_divergence():
    # Layer a: head 0 on key 0, head 1 on key 1; layer b: the heads swapped. The
    # head averages are identical (JSD 0) while each head pair is disjoint (ln 2).
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (H=2, Q=1, K=2)
    b = a.flip(0)
    assert metrics.attn_js(a, b).item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(metrics.attn_js_per_head(a, b), torch.tensor([[LN2], [LN2]]))


def test_attn_js_matrix_symmetric_zero_diagonal_equals_pairwise():
    g = torch.Generator().manual_seed(1)
    layers = [_causal_attention(2, 6, g) for _ in range(3)]
    matrix = metrics.attn_js_matrix(layers)
    assert matrix.shape == (3, 3, 6)
    torch.testing.assert_close(matrix, matrix.transpose(0, 1))
    assert torch.all(matrix.diagonal(dim1=0, dim2=1) == 0)
    torch.testing.assert_close(matrix[0, 2], metrics.attn_js(layers[0], layers[2]))


def test_attn_entropy_uniform_one_one_hot_zero():
    seq_len = 5
    uniform = torch.ones(2, seq_len, seq_len).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    # Query 0 has a single key: defined as 0. Every other uniform row: exactly 1.
    expected = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]] * 2)
    torch.testing.assert_close(metrics.attn_entropy(uniform), expected)
    one_hot = _one_hot_rows(2, seq_len, 0)
    torch.testing.assert_close(metrics.attn_entropy(one_hot), torch.zeros(2, seq_len))


def test_attn_entropy_counts_only_valid_keys():
    # Left padding: keys 0 and 1 are padding. Query 3 is uniform over keys 2, 3 -> 1;
    # query 4 puts 0.5/0.25/0.25 on keys 2, 3, 4 -> H / ln 3.
    a = torch.tensor([[[0.0, 0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.5, 0.25, 0.25]]])  # (1, 2, 5)
    not_padding = torch.tensor([False, False, True, True, True])
    key_mask = metrics.causal_key_mask(torch.tensor([3, 4]), 5, not_padding)
    assert key_mask.tolist() == [
        [False, False, True, True, False],
        [False, False, True, True, True],
    ]
    h4 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    torch.testing.assert_close(metrics.attn_entropy(a, key_mask), torch.tensor([[1.0, h4]]))


def test_bos_mass():
    a = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.6, 0.3, 0.1]]])  # (1, 3, 3)
    torch.testing.assert_close(metrics.bos_mass(a), torch.tensor([[1.0, 0.6, 0.6]]))
    torch.testing.assert_close(metrics.bos_mass(a, first_key=1), torch.tensor([[0.0, 0.4, 0.3]]))


def test_head_match_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(2)
    a = _causal_attention(4, 8, g, sharpness=4.0)
    true_perm = torch.tensor([2, 0, 3, 1])
    b = a[true_perm]  # head g of b is head true_perm[g] of a
    perm, matched, identity = metrics.head_match(a, b)
    # Head h of a reappears as head g of b where true_perm[g] == h: the inverse permutation.
    assert perm.tolist() == true_perm.argsort().tolist()
    assert matched == pytest.approx(0.0, abs=1e-6)
    assert identity > 0.05
    # The identity value is the mean of the per-head JSD with heads paired by index.
    assert identity == pytest.approx(metrics.attn_js_per_head(a, b).mean().item(), abs=1e-6)


def test_head_match_query_mask_and_cost_matrix():
    g = torch.Generator().manual_seed(3)
    a, b = _causal_attention(3, 6, g), _causal_attention(3, 6, g)
    cost = metrics.head_js_matrix(a, b)
    assert cost.shape == (3, 3, 6)
    torch.testing.assert_close(cost[1, 2], metrics.attn_js_per_head(a[1:2], b[2:3])[0])
    query_mask = torch.tensor([False, False, True, True, True, True])
    _, matched, identity = metrics.head_match(a, b, query_mask)
    assert identity == pytest.approx(cost[..., 2:].mean(-1).diagonal().mean().item(), abs=1e-6)
    assert matched <= identity + 1e-9


def test_head_match_rejects_different_head_counts():
    g = torch.Generator().manual_seed(4)
    with pytest.raises(ValueError, match="head counts"):
        metrics.head_match(_causal_attention(2, 4, g), _causal_attention(3, 4, g))
    with pytest.raises(ValueError, match="head counts"):
        metrics.match_heads(torch.zeros(2, 3))


# --- fast paths agree with the reference definitions ------------------------------

from workbench.measures import divergence  # noqa: E402


def _reference_lens(logp_l, logp_final, targets):
    """lens_position_stats written directly from the definitions (the slow path)."""
    argmax_final = logp_final.argmax(-1)

    def rank(token):
        return (logp_l > logp_l.gather(-1, token[:, None])).sum(-1).float()

    return {
        "lens_kl": divergence.kl_divergence(logp_final, logp_l),
        "lens_js": divergence.js_divergence(logp_l, logp_final),
        "final_rank": rank(argmax_final),
        "target_rank": rank(targets),
        "target_nll": -logp_l.gather(-1, targets[:, None]).squeeze(-1),
        "entropy": divergence.entropy(logp_l),
    }


def test_lens_stats_match_the_definitions_dense_and_with_zeros():
    g = torch.Generator().manual_seed(0)
    logp_l = (torch.randn(9, 40, generator=g) * 3).log_softmax(-1)
    logp_final = (torch.randn(9, 40, generator=g) * 3).log_softmax(-1)
    # Rows 0-2 carry exact zeros: in p^L only (KL finite, 0 * -inf terms), in both at
    # the same tokens, and in p^l where p^L has mass (KL = inf).
    logp_final[0, :5] = -math.inf
    logp_final[1, :5] = logp_l[1, :5] = -math.inf
    logp_l[2, :3] = -math.inf
    logp_final, logp_l = logp_final.log_softmax(-1), logp_l.log_softmax(-1)
    targets = torch.randint(5, 40, (9,), generator=g)
    got = metrics.lens_position_stats(logp_l, logp_final, targets)
    want = _reference_lens(logp_l, logp_final, targets)
    assert math.isinf(got["lens_kl"][2].item()) and math.isinf(want["lens_kl"][2].item())
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=2e-6, rtol=1e-5, msg=name)


def test_lens_reference_final_stats_equal_self_comparison():
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(6, 30, generator=g) * 2).log_softmax(-1)
    ref = metrics.LensReference(logp, torch.arange(6))
    fast, full = ref.final_stats(), ref.compare(logp)
    for name in fast:
        torch.testing.assert_close(fast[name], full[name], atol=1e-6, rtol=0, msg=name)


def test_log_softmax_and_probs_matches_torch_with_temperature_and_buffers():
    logits = torch.randn(4, 25) * 5
    out = (torch.empty(4, 25), torch.empty(4, 25))
    logp, p = divergence.log_softmax_and_probs(logits, 0.7, out=out)
    assert logp.data_ptr() == out[0].data_ptr() and p.data_ptr() == out[1].data_ptr()
    torch.testing.assert_close(logp, (logits / 0.7).log_softmax(-1))
    torch.testing.assert_close(p, (logits / 0.7).softmax(-1))


def test_js_divergence_probs_equals_log_space_jsd_and_broadcasts():
    g = torch.Generator().manual_seed(2)
    a = _causal_attention(3, 6, g)  # exact zeros above the diagonal
    b = _causal_attention(4, 6, g)
    got = divergence.js_divergence_probs(a[:, None], b[None])  # (3, 4, 6)
    want = torch.stack([divergence.js_divergence(a[h].log(), b.log()) for h in range(3)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.all(divergence.js_divergence_probs(a, a) == 0)  # identical: exactly 0
    p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert divergence.js_divergence_probs(p, q).item() == pytest.approx(LN2, abs=1e-6)
    assert divergence.sum_xlogx(torch.tensor([0.5, 0.5, 0.0])).item() == pytest.approx(-LN2)


def test_pairwise_attention_chunking_does_not_change_values(monkeypatch):
    g = torch.Generator().manual_seed(3)
    a, b = _causal_attention(3, 9, g), _causal_attention(3, 9, g)
    whole = metrics.head_js_matrix(a, b)
    layers = [_causal_attention(2, 9, g) for _ in range(4)]
    matrix = metrics.attn_js_matrix(layers)
    monkeypatch.setattr(metrics, "PAIR_BUDGET", 20)  # forces one query per chunk
    torch.testing.assert_close(metrics.head_js_matrix(a, b), whole, atol=1e-7, rtol=0)
    torch.testing.assert_close(metrics.attn_js_matrix(layers), matrix, atol=1e-7, rtol=0)
    for h in range(3):  # and both agree with the one-pair definition
        torch.testing.assert_close(
            whole[h], metrics.attn_js_per_head(a[h].expand(3, -1, -1), b), atol=1e-6, rtol=0
        )


def test_per_query_key_masks_and_first_keys():
    # Two queries from different sequences: the first has padding at key 0.
    valid = torch.tensor([[False, True, True], [True, True, True]])
    mask = metrics.causal_key_mask(torch.tensor([2, 1]), 3, valid)
    assert mask.tolist() == [[False, True, True], [True, True, False]]
    a = torch.tensor([[[0.0, 0.3, 0.7], [0.4, 0.6, 0.0]]])  # (H=1, Q=2, K=3)
    assert metrics.bos_mass(a, torch.tensor([1, 0]))[0].tolist() == pytest.approx([0.3, 0.4])
