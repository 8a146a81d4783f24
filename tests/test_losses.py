import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scfs.losses import (DINOLoss, SearchLoss, teacher_temp_schedule, collapse_state, collapse_stats, sinkhorn_knopp,
                         teacher_stats)


def _ref(student_output, teacher_output, center, n_crops, temp, student_temp=0.1):
    so = (student_output / student_temp).chunk(n_crops)
    to = F.softmax((teacher_output - center) / temp, dim=-1).chunk(2)
    tot, n = 0., 0
    for iq, q in enumerate(to):
        for v in range(n_crops):
            if v == iq: continue
            tot = tot + torch.sum(-q * F.log_softmax(so[v], dim=-1), dim=-1).mean(); n += 1
    return tot / n


def test_dino_loss_matches_reference_loop_and_centre():
    torch.manual_seed(0)
    B, K, nc = 3, 17, 6
    crit = DINOLoss(K, nc, 0.04, 0.07, 5, 10)
    crit.center.normal_()
    for epoch in (0, 2, 9, 50):
        s, t = torch.randn(nc * B, K), torch.randn(2 * B, K)
        c0 = crit.center.clone()
        temp = float(teacher_temp_schedule(0.04, 0.07, 5, 10)[min(epoch, 9)])
        torch.testing.assert_close(crit(s, t, epoch), _ref(s, t, c0, nc, temp))
        torch.testing.assert_close(crit.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True))


def test_dino_loss_collapsed_student_is_log_k_and_no_teacher_grad():
    K = 50
    crit = DINOLoss(K, 4)
    loss = crit(torch.zeros(8, K), torch.randn(4, K))
    assert math.isclose(loss.item(), math.log(K), rel_tol=1e-6)
    s = torch.randn(8, K, requires_grad=True); t = torch.randn(4, K, requires_grad=True)
    crit(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert 'center' in crit.state_dict()


def test_temperature_schedule():
    s = teacher_temp_schedule(0.04, 0.07, 3, 5)
    assert len(s) == 5 and all(math.isclose(a, b) for a, b in zip(s, [0.04, 0.055, 0.07, 0.07, 0.07]))
    assert DINOLoss(4, 2, 0.04, 0.07, 3, 5).teacher_temp(99) == 0.07


def test_search_loss_hand_and_both_keys():
    crit = SearchLoss(out_dim=3)
    sg, tg = torch.randn(4, 3), torch.randn(4, 3)
    sl, ts = torch.randn(6, 3, requires_grad=True), torch.randn(12, 3, requires_grad=True)
    out = crit(sg, tg, sl, ts, epoch=0)
    pt = F.softmax(tg / 0.04, -1).chunk(2); ps = F.log_softmax(sg / 0.1, -1).chunk(2)
    g = 0.5 * (-(pt[0] * ps[1]).sum(-1).mean() - (pt[1] * ps[0]).sum(-1).mean())
    lsl = F.log_softmax(sl / 0.1, -1)
    loc = 0.5 * sum(-(F.softmax(t / 0.04, -1) * lsl).sum(-1).mean() for t in ts.chunk(2))
    torch.testing.assert_close(out['global'], g)
    torch.testing.assert_close(out['local'], loc)
    torch.testing.assert_close(out['loss'], 0.5 * (g + loc))
    out['loss'].backward()
    assert ts.grad is None and sl.grad is not None
    torch.testing.assert_close(crit.global_loss.center, 0.1 * tg.mean(0, keepdim=True))


# --- collapse monitor: each state forced, under both centrings -----------------------------------------------------

K, B = 128, 16


def _cosines(n, k=K, d=32, seed=0):
    "Logits shaped like the DINO head's: cosines between n random unit embeddings and k random unit prototypes."
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1) @ F.normalize(torch.randn(k, d, generator=g), dim=-1).T


def _run(centering, teacher_logits, steps=30):
    "A few loss steps on the same teacher batch (the EMA centre catches up), returns the last stats as floats."
    crit = DINOLoss(K, 4, centering=centering)
    for _ in range(steps): crit(torch.randn(4 * B, K), teacher_logits)
    return {k: v.item() for k, v in crit.stats.items()}


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_identical_logits_for_every_image_are_not_ok(centering):
    st = _run(centering, _cosines(1).expand(2 * B, K))
    assert collapse_state(st, K) == 'one-hot' and st['mi'] < 1e-5
    # the post-centring numbers do not see it: the centring hides an output shared by every image
    assert collapse_state(st['teacher_entropy'], st['teacher_kl_uniform'], K) != 'one-hot'


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_uniform_logits_read_uniform(centering):
    st = _run(centering, torch.zeros(2 * B, K))
    assert math.isclose(st['raw_entropy'], math.log(K), rel_tol=1e-5)
    assert collapse_state(st, K) == 'uniform'


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_collapse_stats_are_of_the_raw_logits(centering):
    """The monitor reads softmax(logits / T) before any centring: by hand, with a shared per-prototype offset that the
    centring removes (post-centring entropy would read near ln K, the raw one reads the offset's peak)."""
    logits = _cosines(2 * B) + 3 * F.one_hot(torch.tensor(5), K).float()
    crit = DINOLoss(K, 4, centering=centering)
    for _ in range(30): crit(torch.randn(4 * B, K), logits)
    p = F.softmax(logits / crit.teacher_temp(0), -1)
    h, m = -(p * p.log()).sum(-1).mean(), p.mean(0)
    torch.testing.assert_close(crit.stats['raw_entropy'], h)
    torch.testing.assert_close(crit.stats['raw_mean_entropy'], -(m * m.log()).sum())
    assert crit.stats['raw_entropy'] < 0.1 * math.log(K) < crit.stats['teacher_entropy']


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_random_logits_read_ok(centering):
    st = _run(centering, _cosines(2 * B))
    assert collapse_state(st, K) == 'ok' and st['mi'] > 0.02 * math.log(K)


def test_constant_embeddings_read_constant_and_spread_ones_about_one():
    logits = _cosines(2 * B)
    const = collapse_stats(logits, 0.04, emb=torch.randn(1, 32).expand(2 * B, 32))
    spread = collapse_stats(logits, 0.04, emb=torch.randn(512, 32))
    assert const['emb_std'].item() < 1e-5 and collapse_state(const, K) == 'constant'
    assert 0.9 < spread['emb_std'].item() < 1.1
    crit = DINOLoss(K, 4)
    crit(torch.randn(4 * B, K), logits, teacher_emb=torch.ones(2 * B, 8))
    assert collapse_state(crit.stats, K) == 'constant'


def test_collapse_stats_by_hand_and_prefixes():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    st = collapse_stats(torch.tensor(np.log(p)), 1.0)
    H = lambda q: -(q * np.log(q)).sum(-1)
    assert math.isclose(st['raw_entropy'].item(), H(p).mean(), rel_tol=1e-5)
    assert math.isclose(st['mi'].item(), H(p.mean(0)) - H(p).mean(), rel_tol=1e-5)
    out = {'layer3/raw_entropy': 1.0, 'layer3/mi': 0.01, 'layer3/emb_std': 1.0, 'dino/raw_entropy': 1.0, 'dino/mi': 2.0}
    assert collapse_state(out, 64, prefix='layer3/') == 'one-hot' and collapse_state(out, 64, prefix='dino/') == 'ok'


def test_old_positional_call_still_works():
    assert [collapse_state(e, kl, 64) for e, kl in ((4.0, 0.0), (0.1, 3.0), (1.0, 0.5))] == ['uniform', 'one-hot', 'ok']
    st = teacher_stats(F.one_hot(torch.full((8,), 3), 64).float())
    assert collapse_state(st['teacher_entropy'], st['teacher_kl_uniform'], 64) == 'one-hot'


def test_teacher_student_kl_is_the_kl_of_the_probabilities():
    "Recomputed pair by pair from the teacher targets and the student log-probabilities (both centrings)."
    torch.manual_seed(1)
    for centering in ('ema', 'sinkhorn'):
        crit = DINOLoss(K, 5, centering=centering)
        crit.center.normal_()
        s, t = torch.randn(5 * B, K), torch.randn(2 * B, K)
        pt = crit.teacher_probs(t).view(2, B, K)
        crit(s, t)
        ls = F.log_softmax(s / 0.1, -1).view(5, B, K)
        kl = torch.stack([(pt[i] * (pt[i].clamp_min(1e-30).log() - ls[j])).sum(-1).mean()
                          for i in range(2) for j in range(5) if i != j]).mean()
        torch.testing.assert_close(crit.stats['teacher_student_kl'], kl, rtol=1e-4, atol=1e-5)


def _sinkhorn_numpy(S, n_iter=3):
    "SwAV's distributed_sinkhorn (one process) in float64 NumPy."
    Q = np.exp(S - S.max()).T
    Q /= Q.sum()
    k, n = Q.shape
    for _ in range(n_iter):
        Q /= Q.sum(axis=1, keepdims=True); Q /= k
        Q /= Q.sum(axis=0, keepdims=True); Q /= n
    return (Q * n).T


def test_sinkhorn_three_iterations_as_in_training():
    S = _cosines(128, k=512, d=64, seed=3) / 0.02                     # the tiny preset's scale: K=512, tau_t=0.02
    Q = sinkhorn_knopp(S)                                             # default n_iter=3, what DINOLoss uses
    torch.testing.assert_close(Q.double(), torch.from_numpy(_sinkhorn_numpy(S.double().numpy())), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(Q.sum(1), torch.ones(128))
    tv = lambda q: 0.5 * (q.sum(0) / 128 - 1 / 512).abs().sum().item()
    assert tv(Q) < 0.06 and tv(Q) < tv(sinkhorn_knopp(S, 1)) / 2 < tv(F.softmax(S, -1)) / 4
    crit = DINOLoss(512, 2, teacher_temp=0.02, centering='sinkhorn')
    torch.testing.assert_close(crit.teacher_probs(S * 0.02), Q)


def test_crop_cells_and_locate_loss():
    from scfs.losses import crop_cells, locate_loss
    boxes = torch.tensor([[[16., 0., 48., 32.], [0., 0., 64., 64.], [40., 20., 48., 28.], [0., 40., 8., 48.]]])
    cells, inside = crop_cells(boxes, torch.zeros(1, 4, dtype=torch.bool), 4, 4)
    # centre (44, 24) in view 0 (x 16-48, y 0-32): u = 0.875, v = 0.75 -> row 3, col 3; (4, 44) is outside
    assert cells[0].item() == 15 and inside.tolist() == [True, False]
    cells_f, _ = crop_cells(boxes, torch.tensor([[True, False, False, False]]), 4, 4)
    assert cells_f[0].item() == 12                                        # flipped view 0: column 0
    key = torch.randn(1, 8, 4, 4)
    local = key.flatten(2)[:, :, [15, 3]].permute(2, 1, 0)[..., None]     # crops that look exactly like cells 15 and 3
    l, acc = locate_loss(key, local, torch.tensor([15, 3]), torch.tensor([True, True]), temp=0.01)
    assert acc.item() == 1.0 and l.item() < 0.1
    l2, acc2 = locate_loss(key, local, torch.tensor([3, 15]), torch.tensor([True, True]), temp=0.01)
    assert acc2.item() == 0.0 and l2.item() > 10
