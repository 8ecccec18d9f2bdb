"""Each registered sub-network loss and the KL- logit normalisation against the hand-written formulas of
`st_reference` (published definitions: KL(teacher || student) x T^2, A * layer_norm, DKD's split), and
controls: each known wrong variant (KL reversed, T^2 dropped, amplitude ignored, DKD's parts altered) makes the
comparison fail, so it can see such an error."""
import pytest
import torch

import st_reference as ref
from timm_st.method import losses
from timm_st.method.losses import SubnetLoss, get_subnet_loss, list_subnet_losses

TEMPERATURES = [1.0, 2.0, 4.0]
NORMS = [('layernorm', 1.0), ('layernorm', 3.0), ('l2', 4.0)]


def logits(seed=0, n=6, classes=7):
    """Student and teacher logits far apart (spread 3), class-index targets; float64 so formulas agree to 1e-12."""
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    return student, teacher, torch.randint(0, classes, (n,), generator=g)


def check_loss(name, temperature):
    """The registered loss's value and gradient (w.r.t. the student) equal the reference formula's."""
    student, teacher, target = logits()
    formula, normalized = ref.LOSSES[name]
    if normalized:
        student, teacher = ref.normalize(student), ref.normalize(teacher)
    s_got, s_ref = student.clone().requires_grad_(), student.clone().requires_grad_()
    got = get_subnet_loss(name).fn(s_got, teacher, target, temperature)
    want = formula(s_ref, teacher, target, temperature)
    assert got.ndim == 0 and want > 1e-3, 'the compared loss is (nearly) zero: the check shows nothing'
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(s_got.grad, s_ref.grad, rtol=1e-9, atol=1e-12)


def check_normalization(norm, amplitude):
    z, _, _ = logits()
    torch.testing.assert_close(losses.normalize_logits(z, norm, amplitude), ref.normalize(z, norm, amplitude),
                               rtol=1e-10, atol=0)


def test_every_registered_loss_has_a_reference():
    assert set(list_subnet_losses()) == set(ref.LOSSES)
    for name, (_, normalized) in ref.LOSSES.items():
        assert get_subnet_loss(name).normalized_logits == normalized, name
    assert [n for n in ref.LOSSES if get_subnet_loss(n).hard_labels] == ['dkd']


@pytest.mark.parametrize('temperature', TEMPERATURES)
@pytest.mark.parametrize('name', list(ref.LOSSES))
def test_loss_equals_published_formula(name, temperature):
    check_loss(name, temperature)


@pytest.mark.parametrize('norm,amplitude', NORMS)
def test_normalize_logits_equals_definition(norm, amplitude):
    check_normalization(norm, amplitude)


def test_kl_and_dkd_vanish_only_for_equal_distributions():
    """KL(t || s) >= 0, = 0 for s = t (also shifted by a constant: same softmax); dkd likewise."""
    student, teacher, target = logits()
    for name in ('kl', 'dkd'):
        fn = get_subnet_loss(name).fn
        assert fn(student, teacher, target, 2.0) > 0
        torch.testing.assert_close(fn(teacher + 5.0, teacher, target, 2.0), torch.zeros((), dtype=torch.float64),
                                   atol=1e-12, rtol=0)


# --- controls: known wrong variants the checks above must catch -------------------------------------------------

def _wrap(name, wrong):
    """A registered loss replaced by `wrong(original_fn)`, its flags kept."""
    spec = get_subnet_loss(name)
    return SubnetLoss(wrong(spec.fn), spec.normalized_logits, spec.hard_labels)


LOSS_MUTATIONS = {
    # KL(student || teacher) instead of KL(teacher || student)
    'kl reversed': ('kl', lambda fn: lambda s, t, y, T: fn(t, s, y, T)),
    'kl_direction reversed': ('kl_direction', lambda fn: lambda s, t, y, T: fn(t, s, y, T)),
    'kl without T^2': ('kl', lambda fn: lambda s, t, y, T: fn(s, t, y, T) / T ** 2),
    'soft_ce without T^2': ('soft_ce', lambda fn: lambda s, t, y, T: fn(s, t, y, T) / T ** 2),
    'soft_ce minus teacher entropy (= kl)': ('soft_ce', lambda fn: ref.kl),
    'mse with T^2': ('mse', lambda fn: lambda s, t, y, T: fn(s, t, y, T) * T ** 2),
    'dkd without T^2': ('dkd', lambda fn: lambda s, t, y, T: fn(s, t, y, T) / T ** 2),
    'dkd = plain kl': ('dkd', lambda fn: ref.kl),
    'dkd without nckd': ('dkd', lambda fn: lambda s, t, y, T: fn(s, t, y, T) - _nckd(s, t, y, T)),
}


def _nckd(s, t, y, T):
    log_qs = ref.log_softmax(ref._without_target(s, y) / T)
    log_qt = ref.log_softmax(ref._without_target(t, y) / T)
    return (log_qt.exp() * (log_qt - log_qs)).sum(-1).mean() * T ** 2


@pytest.mark.parametrize('mutation', list(LOSS_MUTATIONS))
def test_loss_check_fails_on_wrong_formula(monkeypatch, mutation):
    name, wrong = LOSS_MUTATIONS[mutation]
    monkeypatch.setitem(losses._LOSSES, name, _wrap(name, wrong))
    # T = 1 cannot tell a missing T^2; every mutation shows at T = 2
    with pytest.raises(AssertionError):
        check_loss(name, 2.0)


NORM_MUTATIONS = {
    'amplitude ignored': lambda fn: lambda z, norm='layernorm', amplitude=1.0: fn(z, norm, 1.0),
    'layer norm eps 1e-5': lambda fn: lambda z, norm='layernorm', amplitude=1.0: (
        amplitude * torch.nn.functional.layer_norm(z, z.shape[-1:], eps=1e-5) if norm == 'layernorm'
        else fn(z, norm, amplitude)),
    'unbiased variance': lambda fn: lambda z, norm='layernorm', amplitude=1.0: (
        amplitude * (z - z.mean(-1, keepdim=True)) / (z.var(-1, keepdim=True) + 1e-7).sqrt()
        if norm == 'layernorm' else fn(z, norm, amplitude)),
    'l2 as layer norm': lambda fn: lambda z, norm='layernorm', amplitude=1.0: fn(z, 'layernorm', amplitude),
}


@pytest.mark.parametrize('mutation', list(NORM_MUTATIONS))
def test_normalization_check_fails_on_wrong_variant(monkeypatch, mutation):
    monkeypatch.setattr(losses, 'normalize_logits', NORM_MUTATIONS[mutation](losses.normalize_logits))
    with pytest.raises(AssertionError):
        for norm, amplitude in NORMS:
            check_normalization(norm, amplitude)
