import math
import torch
import torch.nn.functional as F
from scfs.losses import DINOLoss, SearchLoss, teacher_temp_schedule


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
