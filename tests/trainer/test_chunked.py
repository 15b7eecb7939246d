"""``chunked_rows``: full-vocabulary terms computed chunk by chunk equal the unchunked
ones in value and gradient, recompute their logits in backward, and keep no (n, V)
tensor for it. The loop-level check (every method's loss) is in test_loop.py."""

import functools

import pytest
import torch

from trainer import objectives as obj
from trainer.chunked import chunked_rows
from workbench.errors import ConfigError
from workbench.measures.divergence import entropy
from workbench.models.readout import vocab_chunk_rows

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
    teacher_hidden = torch.randn(N, D) * 2
    return readout, hidden, teacher_hidden


FUNCTIONS = {
    "oisd": obj.oisd_logit_alignment,
    "sdpg": functools.partial(obj.sdpg_reverse_kl, temperature=0.7),
    "opsd": functools.partial(obj.opsd_jsd, beta=0.9),
}
CHUNKS = [1, 3, N, N + 5]


def _grads(value, readout, hidden):
    params = [hidden, *readout.parameters()]
    weights = torch.linspace(-1.0, 2.0, value.numel())  # a non-uniform upstream gradient
    return torch.autograd.grad((weights * value).sum(), params, retain_graph=True)


def _terms(fn, readout, teacher_readout=None):
    """A per-row function like the loop's: student logits read out inside, the teacher's
    under no_grad, one divergence and the sampled-token log-prob out."""
    teacher_readout = teacher_readout or readout

    def terms(r):
        z = readout(r["hidden"])
        with torch.no_grad():
            q = teacher_readout(r["teacher"])
        logp, ent = obj.sampled_token_logprobs(z, r["tokens"], 0.8)
        return {"div": fn(z, q), "logp": logp, "entropy": ent}

    return terms


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_chunked_rows_match_unchunked(setup, name, chunk_size):
    readout, hidden, teacher_hidden = setup
    tokens = torch.randint(V, (N,))
    inputs = {"hidden": hidden, "teacher": teacher_hidden, "tokens": tokens}
    terms = _terms(FUNCTIONS[name], readout)
    expected = terms(inputs)
    got = chunked_rows(terms, inputs, chunk_size)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].shape == (N,)
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    assert not got["entropy"].requires_grad
    for key in ("div", "logp"):
        for g, want in zip(_grads(got[key], readout, hidden), _grads(expected[key], readout, hidden)):
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-5)


def test_sampled_token_logprobs_is_the_plain_formula(setup):
    readout, hidden, _ = setup
    tokens = torch.randint(V, (N,))
    log_probs = torch.log_softmax(readout(hidden) / 0.6, -1)
    logp, ent = obj.sampled_token_logprobs(readout(hidden), tokens, 0.6)
    torch.testing.assert_close(logp, log_probs.gather(-1, tokens[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, entropy(log_probs).detach())
    with pytest.raises(ValueError, match="tokens"):
        obj.sampled_token_logprobs(readout(hidden), tokens[:3])


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_teacher_is_read_out_chunk_by_chunk_forward_and_backward(setup, chunk_size):
    readout, hidden, teacher_hidden = setup
    calls = []

    def teacher_readout(h):
        calls.append(h.shape[0])
        return readout(h)

    inputs = {"hidden": hidden, "teacher": teacher_hidden, "tokens": torch.zeros(N, dtype=torch.long)}
    out = chunked_rows(_terms(obj.oisd_logit_alignment, readout, teacher_readout), inputs, chunk_size)
    n_chunks = -(-N // chunk_size)
    assert len(calls) == n_chunks and max(calls) <= chunk_size
    out["div"].sum().backward()
    assert len(calls) == 2 * n_chunks and max(calls) <= chunk_size  # recomputed in backward


def test_chunking_keeps_no_full_vocabulary_tensor():
    torch.manual_seed(0)
    n, d, vocab, chunk = 64, 4, 512, 8
    head = torch.nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(n, d, requires_grad=True)
    inputs = {"hidden": hidden, "teacher": torch.randn(n, d), "tokens": torch.randint(vocab, (n,))}
    terms = _terms(obj.sdpg_reverse_kl, head)

    def largest_activation_saved(compute):
        sizes = [0]

        def pack(t):
            if t.untyped_storage().data_ptr() != head.weight.untyped_storage().data_ptr():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compute()
        return max(sizes), out

    full, _ = largest_activation_saved(lambda: chunked_rows(terms, inputs, 0))
    assert full >= n * vocab  # unchunked keeps (n, V): the check can fail
    saved, out = largest_activation_saved(lambda: chunked_rows(terms, inputs, chunk))
    assert saved < chunk * vocab
    (out["div"] + out["logp"]).sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None


def test_no_grad_mode_skips_checkpointing(setup):
    readout, hidden, teacher_hidden = setup
    inputs = {"hidden": hidden, "teacher": teacher_hidden, "tokens": torch.zeros(N, dtype=torch.long)}
    with torch.no_grad():
        got = chunked_rows(_terms(obj.opsd_jsd, readout), inputs, 2)
    torch.testing.assert_close(got["div"], obj.opsd_jsd(readout(hidden), readout(teacher_hidden)).detach())
    assert not got["logp"].requires_grad


def test_bad_inputs(setup):
    readout, hidden, teacher_hidden = setup
    terms = _terms(obj.opsd_jsd, readout)
    inputs = {"hidden": hidden, "teacher": teacher_hidden, "tokens": torch.zeros(N, dtype=torch.long)}
    with pytest.raises(ConfigError, match="chunk_size"):
        chunked_rows(terms, inputs, -1)
    with pytest.raises(ValueError, match="first dimension"):
        chunked_rows(terms, {**inputs, "teacher": teacher_hidden[:3]}, 2)


def test_vocab_chunk_rows():
    assert vocab_chunk_rows(151_936) == (1 << 23) // 151_936 == 55  # the loss on CPU: 32 MiB chunks
    assert vocab_chunk_rows(151_936, "cuda") == (1 << 25) // 151_936 == 220
    assert vocab_chunk_rows(101, "cpu") == (1 << 23) // 101
    assert vocab_chunk_rows(10**9) == 1
    assert vocab_chunk_rows(151_936, "cpu", "lens") == (1 << 22) // 151_936 == 27  # the probes' lens pass: 16 MiB
    assert vocab_chunk_rows(151_936, "cuda", "lens") == 220
