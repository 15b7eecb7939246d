"""student_divergence: the closed-form gradient against autograd of the plain formulas."""

import math

import pytest
import torch

from workbench.measures.divergence import generalized_jsd, kl_divergence, student_divergence


def _reference(logits, log_q, temperature, beta):
    log_p = torch.log_softmax(logits / temperature, -1)
    if beta is None:
        return kl_divergence(log_p, log_q)
    return generalized_jsd(log_q, log_p, beta)  # beta weights the teacher


def _inputs(dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(6, 11, generator=g, dtype=dtype) * scale).requires_grad_()
    log_q = torch.log_softmax(torch.randn(6, 11, generator=g, dtype=dtype) * scale, -1)
    return logits, log_q


@pytest.mark.parametrize("beta", [None, 0.5, 0.1, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_value_and_gradient_equal_autograd_of_the_formula(beta, temperature):
    logits, log_q = _inputs(torch.float64)
    weights = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)  # a non-uniform upstream gradient
    want = _reference(logits, log_q, temperature, beta)
    (want_grad,) = torch.autograd.grad((weights * want).sum(), logits)
    got = student_divergence(logits, log_q, temperature, beta)
    (got_grad,) = torch.autograd.grad((weights * got).sum(), logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("beta", [None, 0.5, 0.3])
def test_gradcheck(beta):
    logits, log_q = _inputs(torch.float64, scale=1.0, seed=1)
    assert torch.autograd.gradcheck(lambda z: student_divergence(z, log_q, 0.8, beta), (logits,))


def test_known_values_and_bounds():
    z = torch.tensor([[0.0, 0.0], [50.0, -50.0]])
    same = torch.log_softmax(z, -1)
    assert torch.allclose(student_divergence(z, same), torch.zeros(2), atol=1e-6)
    assert torch.allclose(student_divergence(z, same, beta=0.5), torch.zeros(2), atol=1e-6)
    disjoint = torch.log_softmax(torch.tensor([[-50.0, 50.0]]), -1)
    jsd = student_divergence(torch.tensor([[50.0, -50.0]]), disjoint, beta=0.5)
    assert jsd.item() == pytest.approx(math.log(2), abs=1e-6)  # disjoint supports: ln 2
    kl = student_divergence(torch.tensor([[0.0, math.log(3.0)]]), torch.log(torch.tensor([[0.5, 0.5]])))
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)


def test_half_precision_logits_are_computed_in_float32():
    logits, log_q = _inputs(torch.float32)
    got = student_divergence(logits.detach().bfloat16().requires_grad_(), log_q, beta=0.5)
    assert got.dtype == torch.float32
    got.sum().backward()
    want = _reference(logits.detach().bfloat16().float(), log_q, 1.0, 0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bad_arguments():
    logits, log_q = _inputs(torch.float32)
    with pytest.raises(ValueError, match="beta"):
        student_divergence(logits, log_q, beta=1.0)
    with pytest.raises(ValueError, match="shape"):
        student_divergence(logits, log_q[:3])
