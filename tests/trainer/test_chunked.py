"""Chunked divergences and log-probs equal the unchunked ones, in value and gradient,
and keep no (n, V) tensor for backward."""

import functools

import pytest
import torch

from trainer import objectives as obj
from workbench.divergence import entropy
from workbench.errors import ConfigError

N, D, V = 7, 5, 13


class Readout(torch.nn.Module):
    """A final norm then an unembedding, like ``lm_head(final_norm(h))``."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, V, bias=False)

    def forward(self, h):
        return self.head(self.norm(h))


@pytest.fixture
def setup():
    torch.manual_seed(0)
    readout = Readout()
    with torch.no_grad():
        readout.norm.weight.uniform_(0.5, 1.5)
        readout.norm.bias.normal_()
    hidden = torch.randn(N, D, requires_grad=True)
    teacher = torch.randn(N, V) * 2
    return readout, hidden, teacher


FUNCTIONS = {
    "oisd": obj.oisd_logit_alignment,
    "sdpg": functools.partial(obj.sdpg_reverse_kl, temperature=0.7),
    "opsd": functools.partial(obj.opsd_jsd, beta=0.9),
}
CHUNKS = [1, 3, N, N + 5]


def _grads(value, readout, hidden):
    params = [hidden, *readout.parameters()]
    weights = torch.linspace(-1.0, 2.0, value.numel())  # a non-uniform upstream gradient
    return torch.autograd.grad((weights * value).sum(), params)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_chunked_token_divergence_matches_unchunked(setup, name, chunk_size):
    readout, hidden, teacher = setup
    fn = FUNCTIONS[name]
    expected = fn(readout(hidden), teacher)
    expected_grads = _grads(expected, readout, hidden)
    value = obj.chunked_token_divergence(fn, hidden, readout, teacher, chunk_size)
    assert value.shape == (N,)
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(_grads(value, readout, hidden), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_token_divergence_callable_teacher(setup, chunk_size):
    readout, hidden, _ = setup
    teacher_hidden = torch.randn(N, D)
    calls = []

    def teacher(start, end):
        calls.append((start, end))
        return readout(teacher_hidden[start:end])

    expected = obj.oisd_logit_alignment(readout(hidden), readout(teacher_hidden))
    expected_grads = _grads(expected, readout, hidden)
    value = obj.chunked_token_divergence(
        obj.oisd_logit_alignment, hidden, readout, teacher, chunk_size
    )
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(_grads(value, readout, hidden), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # called chunk by chunk (forward, then again in backward's recompute), never on all n
    chunks = {(s, min(s + chunk_size, N)) for s in range(0, N, chunk_size)}
    assert set(calls) == chunks and len(calls) == 2 * len(chunks)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_selected_logprobs_matches_unchunked(setup, chunk_size, temperature):
    readout, hidden, _ = setup
    tokens = torch.randint(V, (N,))
    log_probs = torch.log_softmax(readout(hidden) / temperature, -1)
    expected = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
    expected_entropy = entropy(log_probs).detach()
    expected_grads = _grads(expected, readout, hidden)
    logp, ent = obj.chunked_selected_logprobs(hidden, readout, tokens, temperature, chunk_size)
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ent, expected_entropy, atol=1e-6, rtol=1e-5)
    assert not ent.requires_grad
    for got, want in zip(_grads(logp, readout, hidden), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def _largest_saved(compute):
    """numel of the largest tensor that autograd saves for backward while ``compute`` runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compute()
    return max(sizes), out


def test_chunking_keeps_no_full_vocabulary_tensor():
    torch.manual_seed(0)
    n, d, vocab, chunk = 64, 4, 512, 8
    head = torch.nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(n, d, requires_grad=True)
    teacher_hidden = torch.randn(n, d)
    tokens = torch.randint(vocab, (n,))

    def teacher(start, end):
        return head(teacher_hidden[start:end])

    # the unchunked computation does save (n, V) tensors: the check can fail
    full, _ = _largest_saved(lambda: obj.sdpg_reverse_kl(head(hidden), head(teacher_hidden)))
    assert full >= n * vocab

    saved, value = _largest_saved(
        lambda: obj.chunked_token_divergence(obj.sdpg_reverse_kl, hidden, head, teacher, chunk)
    )
    assert saved < chunk * vocab  # only the chunks' inputs (hidden rows) are kept
    value.sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None

    saved, (logp, _) = _largest_saved(
        lambda: obj.chunked_selected_logprobs(hidden, head, tokens, 1.0, chunk)
    )
    assert saved < chunk * vocab
    logp.sum().backward()


def test_no_grad_mode_skips_checkpointing(setup):
    readout, hidden, teacher = setup
    with torch.no_grad():
        value = obj.chunked_token_divergence(obj.opsd_jsd, hidden, readout, teacher, 2)
        tokens = torch.zeros(N, dtype=torch.long)
        logp, ent = obj.chunked_selected_logprobs(hidden, readout, tokens, 1.0, 2)
    torch.testing.assert_close(value, obj.opsd_jsd(readout(hidden), teacher).detach())
    assert logp.shape == ent.shape == (N,) and not logp.requires_grad


def test_bad_chunk_size(setup):
    readout, hidden, teacher = setup
    with pytest.raises(ConfigError, match="chunk_size"):
        obj.chunked_token_divergence(obj.opsd_jsd, hidden, readout, teacher, 0)
