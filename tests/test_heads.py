import copy
import pytest
import torch
import torch.nn.functional as F
from scfs.heads import DINOHead, SearchHead, cancel_gradients_last_layer


def test_dino_head_fixed_norm_and_cosine_logits():
    torch.manual_seed(0)
    h = DINOHead(64, out_dim=300, hidden_dim=128, bottleneck_dim=32)
    x = torch.randn(5, 64)
    y = h(x)
    assert y.shape == (5, 300)
    v = h.last_layer.parametrizations.weight.original1
    torch.testing.assert_close(y, F.normalize(h.mlp(x), dim=1) @ F.normalize(v, dim=1).T)
    g = h.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.equal(g, torch.ones_like(g))
    y.sum().backward()
    assert g.grad is None and v.grad is not None


def test_dino_head_deepcopy_state_dict_ema():
    torch.manual_seed(0)
    s = DINOHead(16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    t = copy.deepcopy(s)
    for p in t.parameters(): p.requires_grad_(False)
    with torch.no_grad():
        for p in s.parameters(): p.add_(0.1)  # g has no grad but is a parameter: simulate drift on v only below
        s.last_layer.parametrizations.weight.original0.fill_(1.)
        for ps, pt in zip(s.parameters(), t.parameters()): pt.mul_(0.5).add_(ps, alpha=0.5)
    assert torch.equal(t.last_layer.parametrizations.weight.original0, torch.ones(20, 1))
    fresh = DINOHead(16, out_dim=20, hidden_dim=32, bottleneck_dim=8)
    fresh.load_state_dict(t.state_dict(), strict=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), t(x))
    assert not torch.allclose(fresh(x), DINOHead(16, out_dim=20, hidden_dim=32, bottleneck_dim=8)(x))


def test_norm_last_layer_false_trains_g():
    h = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    h(torch.randn(2, 8)).pow(2).sum().backward()
    assert h.last_layer.parametrizations.weight.original0.grad is not None


def test_cancel_gradients_last_layer():
    h = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    h(torch.randn(2, 8)).pow(2).sum().backward()
    cancel_gradients_last_layer(0, h, 1)
    assert h.last_layer.parametrizations.weight.original1.grad is None
    assert h.mlp[0].weight.grad is not None
    h(torch.randn(2, 8)).pow(2).sum().backward()
    cancel_gradients_last_layer(1, h, 1)
    assert h.last_layer.parametrizations.weight.original1.grad is not None


def test_search_head_shapes_any_channels():
    for C in (16, 64, 2048 // 8):
        sh = SearchHead(C, out_dim=256, hidden_dim=32)
        for hw in (1, 3, 7):
            z = sh(torch.randn(4, C, hw, hw))
            assert z.shape == (4, 256)
            torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_search_head_residual():
    sh = SearchHead(8, hidden_dim=16, bottleneck=4)
    torch.nn.init.zeros_(sh.bn3.weight)
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(sh.block(x), x.relu())
    assert sh.conv2.kernel_size == (3, 3) and sh.conv1.out_channels == 4


def test_forward_searched_equals_forward_on_searched():
    from scfs.search import search_features
    torch.manual_seed(0)
    sh = SearchHead(16, hidden_dim=32)
    for keys, V in (("first", 1), ("both", 2)):
        loc, glob = torch.randn(3 * 2, 16, 2, 2), torch.randn(2 * 2, 16, 5, 5)
        S, A = search_features(loc, glob, 3, keys=keys)
        torch.testing.assert_close(sh.forward_searched(glob[:V * 2], A, S, views=V), sh(S), atol=1e-5, rtol=1e-4)


def _block_nchw(h, x):
    "The search head's block as the plain NCHW formula (the reference for the channels-last implementation)."
    out = F.relu(h.bn1(h.conv1(x)))
    out = F.relu(h.bn2(h.conv2(out)))
    return F.relu(h.bn3(h.conv3(out)) + x)


def test_block_equals_nchw_formula_with_and_without_autograd():
    "With autograd (student) the block keeps the input's layout; without (teacher) it runs channels-last: same numbers."
    torch.manual_seed(0)
    sh = SearchHead(32, hidden_dim=64)
    for shape in ((5, 32, 9, 9), (12, 32, 2, 2)):
        xa = torch.randn(*shape, requires_grad=True)
        xb = xa.detach().clone().requires_grad_(True)
        ya, yb = sh.block(xa), _block_nchw(sh, xb)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(yb)
        ya.backward(g); yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
        with torch.no_grad(): yc = sh.block(xa)
        assert yc.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(yc, yb.detach())
    assert not torch.allclose(yb, xb.detach().relu())  # the block is not the identity here


def test_forward_searched_without_s_and_running_stats():
    from scfs.search import search_features
    torch.manual_seed(1)
    sh = SearchHead(24, hidden_dim=32)
    loc, glob = torch.randn(4 * 3, 24, 3, 3), torch.randn(2 * 3, 24, 6, 6)
    S, A = search_features(loc, glob, 4)
    sh2 = copy.deepcopy(sh)
    with torch.no_grad():
        ref, out = sh(S), sh2.forward_searched(glob[:3], A)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for bn in ('bn1', 'bn2', 'bn3'):
        for buf in ('running_mean', 'running_var'):
            torch.testing.assert_close(getattr(getattr(sh2, bn), buf), getattr(getattr(sh, bn), buf))
    with pytest.raises(ValueError): sh.forward_searched(glob[:3], A, S[:-1])
    with pytest.raises(ValueError): sh.forward_searched(glob[:5], A)   # 12 maps are not n * 5


def test_model_loss_equals_plain_teacher_head_on_searched():
    "SCFS.forward with the fast teacher path gives the loss of th(searched) computed the plain way."
    from scfs.model import SCFS
    torch.manual_seed(0)
    m = SCFS('small', n_local=2, out_dim=64, head_hidden=32, layer_out_dim=16, epochs=2, loc_weight=0.0)
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    ref_m = copy.deepcopy(m)
    def plain(th):                                     # the plain formula: S = A * F built here, the head's NCHW block on it
        def f(keys, maps, searched=None, views=1):
            (VB, C, H, W), n = keys.shape, maps.shape[0] // keys.shape[0]
            S = (maps.view(views, n, VB // views, 1, H, W) * keys.view(views, 1, VB // views, C, H, W)).reshape(-1, C, H, W)
            return th.embed(_block_nchw(th, S))
        return f
    for th in ref_m.teacher['layer_heads'].values(): th.forward_searched = plain(th)
    out, ref = m(crops, epoch=1), ref_m(crops, epoch=1)
    for k in ('loss', 'layer2', 'layer3', 'layer4'): torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)
