import copy
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
