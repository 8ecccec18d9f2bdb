"""Cheaper sub-network schedules: `subnet_interval` and `subnet_batch_fraction`.

Each key's gradient equals that of its definition, computed by hand here (sub-networks assembled from
the model's own stem, blocks and head; the KL loss written out): with `subnet_interval: k`, training
steps 0, k, 2k, ... of the run (one step = one `task(x, y)` call with gradients enabled, counted across
epochs) have `main + coef * sum_i loss_i` and the others `main` alone; with `subnet_batch_fraction: f`,
every sub-network loss is the mean over exactly the first ceil(f * B) images, against the teacher
logits and targets of those images. Each comparison is checked to be able to fail: most gradient
elements are non-zero, and the wrong decision (sub-networks or not) would be far outside the tolerance.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.task import resume_task_checkpoint

from conftest import FixedSampler, assert_nontrivial_grads, batch, clone, subnet_forward
from timm_st import StimulativeConfig, StimulativeTask, SubnetPlan
from timm_st.method.config import describe_method
from timm_st.method.losses import dkd_loss

# resnet18 (the `resnet` fixture: stage depths 2, 2, 2, 2, every residual branch active) at 64 px
PLANS = [SubnetPlan.prefix((1, 2, 1, 1)), SubnetPlan.from_masks([[1, 1], [1, 0], [1, 1], [1, 0]], input_size=48),
         SubnetPlan.prefix((2, 1, 2, 1), input_size=40)]


# --- the reference, by hand (conftest's `subnet_forward` assembles a sub-network from the model's modules) ---

def kl(student, teacher):
    """KL(softmax(teacher) || softmax(student)), averaged over the images (temperature 1)."""
    p = teacher.softmax(-1)
    return (p * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1).mean()


def param_grads(model):
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def reference_parts(model, x, y, plans, n, loss=None):
    """Gradients of the main loss and of the summed sub-network losses on the first `n` images, apart, and the
    sub-network losses. BatchNorm uses batch statistics (train mode), so running statistics do not matter."""
    loss = loss or (lambda student, teacher, target: kl(student, teacher))
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    main = param_grads(model)
    model.zero_grad(set_to_none=True)
    teacher = out.detach()[:n]
    losses = [loss(subnet_forward(model, plan, x[:n]), teacher, y[:n]) for plan in plans]
    sum(losses).backward()
    subnets = param_grads(model)
    model.zero_grad(set_to_none=True)
    return main, subnets, torch.stack([l.detach() for l in losses])


def combine(main, subnets, coef):
    return {k: main[k] + coef * subnets[k] for k in main}


def rel_err(got, ref):
    num = sum(float((got[k] - ref[k]).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].pow(2).sum()) for k in ref)
    return math.sqrt(num / den)


def task_step(task, x, y, accum=1):
    """One micro-batch as timm's loop runs it: task(x, y), loss /= accum, one backward."""
    loss = task(x, y)['loss']
    if accum > 1:
        loss /= accum
    loss.backward()
    return task.subnet_loss


TOL = 1e-5  # relative, float32: the task and the reference add the same terms in another order


def check_step(task, ref_model, x, y, plans, coef, n, with_subnets, loss=None, accum=1):
    """One step of `task` against the definition: gradients and `subnet_loss`; the other decision (sub-networks
    or not) would differ by far more than the tolerance."""
    task.model.zero_grad(set_to_none=True)
    subnet_loss = task_step(task, x, y, accum)
    main, subnets, losses = reference_parts(ref_model, x, y, plans, n, loss)
    expected, other = (combine(main, subnets, coef), main) if with_subnets else (main, combine(main, subnets, coef))
    got = {k: v * accum for k, v in param_grads(task.model).items()}  # the loop divided the loss by accum
    assert_nontrivial_grads(expected)
    assert rel_err(other, expected) > 1000 * TOL, 'the test could not tell the two decisions apart'
    assert rel_err(got, expected) < TOL
    if with_subnets:
        assert isinstance(subnet_loss, torch.Tensor)
        torch.testing.assert_close(subnet_loss, losses.mean())
    else:
        assert subnet_loss is None


# --- subnet_interval --------------------------------------------------------------------------------------

def test_interval_runs_subnets_on_every_kth_step_of_the_run(resnet):
    """interval 3 over two epochs of 4 and 3 steps, with a no-grad call in between: sub-networks on the run's
    steps 0, 3 and 6 only (the phase carries over the epoch boundary; no-grad calls are not steps)."""
    coef = 0.7
    task = StimulativeTask(clone(resnet), {'num_subnets': 2, 'coef': coef, 'subnet_interval': 3},
                           sampler=FixedSampler(PLANS[:2]), verbose=False)
    ref_model = clone(resnet)
    step = 0
    for epoch, steps in enumerate((4, 3)):
        task.set_epoch(epoch)
        for _ in range(steps):
            x, y = batch(seed=step)
            check_step(task, ref_model, x, y, PLANS[:2], coef, n=4, with_subnets=step % 3 == 0)
            step += 1
            if step == 2:
                with torch.no_grad():
                    assert task(x, y)['loss'].isfinite() and task.subnet_loss is None
    assert task.sampler.calls == 2 * 3 and task.train_steps == 7


def test_interval_counts_micro_batches_under_accumulation(resnet):
    """A step is a micro-batch: with 2 micro-batches per optimizer step and interval 2, the first micro-batch
    of each optimizer step has sub-networks, the second does not (the loop divides each loss by 2)."""
    task = StimulativeTask(clone(resnet), {'num_subnets': 1, 'subnet_interval': 2},
                           sampler=FixedSampler(PLANS[1:2]), verbose=False)
    ref_model = clone(resnet)
    for micro in range(4):
        x, y = batch(seed=10 + micro)
        check_step(task, ref_model, x, y, PLANS[1:2], 1.0, n=4, with_subnets=micro % 2 == 0, accum=2)


def test_interval_with_start_epoch_and_fraction(resnet):
    """start_epoch 1, interval 2, fraction 0.5 on batches of 5, resized sub-network inputs: epoch 0 (steps 0-2)
    has none; in epoch 1 the run's even steps (4) have sub-networks on the first 3 images, the odd (3, 5) none."""
    config = {'num_subnets': 2, 'coef': 0.5, 'subnet_interval': 2, 'subnet_batch_fraction': 0.5, 'start_epoch': 1}
    task = StimulativeTask(clone(resnet), config, sampler=FixedSampler(PLANS[1:]), verbose=False)
    ref_model = clone(resnet)
    step = 0
    for epoch in (0, 1):
        task.set_epoch(epoch)
        for _ in range(3):
            x, y = batch(seed=20 + step, n=5)
            check_step(task, ref_model, x, y, PLANS[1:], 0.5, n=3, with_subnets=epoch == 1 and step % 2 == 0)
            step += 1


# --- subnet_batch_fraction --------------------------------------------------------------------------------

@pytest.mark.parametrize('fraction, batch_size, n', [(0.5, 4, 2), (0.5, 5, 3), (0.25, 6, 2), (0.3, 10, 3),
                                                     (0.07, 100, 7), (0.56, 50, 28), (0.01, 4, 1), (1.0, 7, 7)])
def test_subnet_batch_size_is_ceil_of_fraction(fraction, batch_size, n):
    """ceil(f * B), exact for decimal fractions (0.07 * 100 is 7.000000000000001 in floating point)."""
    assert StimulativeConfig.from_dict({'subnet_batch_fraction': fraction}).subnet_batch_size(batch_size) == n


@pytest.mark.parametrize('loss', ['kl', 'dkd'])
def test_fraction_losses_on_first_images_teacher_and_targets_alike(resnet, loss):
    """fraction 0.5 of a batch of 6: each sub-network loss is the mean over images 0-2, against the full network's
    logits and (dkd uses them) the targets of images 0-2."""
    ref_loss = (lambda s, t, y: kl(s, t)) if loss == 'kl' else (lambda s, t, y: dkd_loss(s, t, y, 1.0))
    task = StimulativeTask(clone(resnet), {'num_subnets': 2, 'coef': 0.8, 'loss': loss,
                                                 'subnet_batch_fraction': 0.5},
                           sampler=FixedSampler(PLANS), verbose=False)
    ref_model = clone(resnet)
    for step in range(2):
        x, y = batch(seed=30 + step, n=6)
        plans = [PLANS[(2 * step) % 3], PLANS[(2 * step + 1) % 3]]
        check_step(task, ref_model, x, y, plans, 0.8, n=3, with_subnets=True, loss=ref_loss)


# --- resumption -------------------------------------------------------------------------------------------

def recorded_run(task, seeds):
    """Per step: (sub-networks ran, the plans drawn)."""
    drawn = []
    sample = task.sampler.sample
    task.sampler.sample = lambda input_height=None: drawn.append(sample(input_height=input_height)) or drawn[-1]
    record = []
    for seed in seeds:
        before = len(drawn)
        subnet_loss = task_step(task, *batch(seed=seed, n=2, size=32))
        record.append((subnet_loss is not None, drawn[before:]))
    task.sampler.sample = sample
    return record


def test_resume_continues_interval_phase_and_plans(resnet, tmp_path):
    """Task state saved after step 4 and loaded into a fresh task: steps 4-9 run sub-networks on the same steps
    (interval 3: 6 and 9) with the same plans as an uninterrupted run."""
    config = {'num_subnets': 1, 'subnet_interval': 3, 'input_scale': [0.5, 1.0], 'seed': 5}
    full = recorded_run(StimulativeTask(clone(resnet), config, verbose=False), range(10))
    assert [ran for ran, _ in full] == [i % 3 == 0 for i in range(10)]

    first = StimulativeTask(clone(resnet), config, verbose=False)
    assert recorded_run(first, range(4)) == full[:4]
    path = tmp_path / 'checkpoint.pth.tar'
    torch.save({'epoch': 0, 'version': 2, **first.get_checkpoint_state()}, path)
    resumed = StimulativeTask(clone(resnet), config, verbose=False)
    resume_task_checkpoint(resumed, str(path), log_info=False)
    assert resumed.train_steps == 4
    assert recorded_run(resumed, range(4, 10)) == full[4:]


# --- validation, help, naming -----------------------------------------------------------------------------

@pytest.mark.parametrize('key, value, allowed', [
    ('subnet_interval', 0, 'an integer >= 1'),
    ('subnet_interval', -2, 'an integer >= 1'),
    ('subnet_interval', 2.0, 'an integer >= 1'),
    ('subnet_interval', True, 'an integer >= 1'),
    ('subnet_interval', '3', 'an integer >= 1'),
    ('subnet_batch_fraction', 0, 'a number in (0, 1]'),
    ('subnet_batch_fraction', 1.5, 'a number in (0, 1]'),
    ('subnet_batch_fraction', -0.5, 'a number in (0, 1]'),
    ('subnet_batch_fraction', float('nan'), 'a number in (0, 1]'),
    ('subnet_batch_fraction', '0.5', 'a number in (0, 1]'),
    ('subnet_batch_fraction', None, 'a number in (0, 1]'),
])
def test_bad_values_refused_in_one_line(key, value, allowed):
    with pytest.raises(ValueError) as err:
        StimulativeConfig.from_dict({key: value})
    message = str(err.value)
    assert '\n' not in message
    assert message.startswith(f'stimulative.{key}: got {value!r}; allowed: {allowed}')


def test_good_values_and_defaults():
    assert StimulativeConfig.from_dict({}).subnet_interval == 1
    assert StimulativeConfig.from_dict({}).subnet_batch_fraction == 1.0
    config = StimulativeConfig.from_dict({'subnet_interval': 4, 'subnet_batch_fraction': 1})
    assert (config.subnet_interval, config.subnet_batch_fraction) == (4, 1.0)
    assert type(config.subnet_batch_fraction) is float


@pytest.mark.parametrize('section, tag, text', [
    ({'num_subnets': 1, 'subnet_interval': 3}, 'st', 'stimulative training (ST) with sub-networks on every 3rd step'),
    ({'num_subnets': 1, 'subnet_batch_fraction': 0.25}, 'st', 'stimulative training (ST) with sub-networks on 25% '
                                                             'of each batch'),
    ({'num_subnets': 2, 'subnet_interval': 2, 'subnet_batch_fraction': 0.5}, 'stpp',
     'stimulative training++ (ST++) with sub-networks on every 2nd step and on 50% of each batch'),
    ({'num_subnets': 1, 'subnet_interval': 11}, 'st', 'stimulative training (ST) with sub-networks on every 11th step'),
    ({'num_subnets': 1, 'subnet_interval': 22}, 'st', 'stimulative training (ST) with sub-networks on every 22nd step'),
    ({'num_subnets': 0, 'subnet_interval': 3}, 'ct', 'common training (CT'),
    ({'num_subnets': 1, 'subnet_interval': 1, 'subnet_batch_fraction': 1.0}, 'st', 'stimulative training (ST)'),
])
def test_method_names_the_schedule_and_keeps_the_tag(section, tag, text):
    got_tag, description, strategies = describe_method(section)
    assert got_tag == tag and description.startswith(text)
    if tag != 'ct':
        assert description == text
    assert not any('every' in s or 'batch' in s for s in strategies)  # ST++ strategies only
