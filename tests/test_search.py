import math

import numpy as np
import pytest
import torch

from scfs.search import search_features, search_features_loop

torch.set_num_threads(2)


def _reference(local, glob, n_local, view=0, softmax=False, T=1.0):
    """Independent implementation with numpy and explicit Python loops over images, crops and positions."""
    local, glob = local.detach().double().numpy(), glob.detach().double().numpy()
    nB, C, h, w = local.shape
    B = nB // n_local
    _, _, H, W = glob.shape
    S = np.zeros((nB, C, H, W))
    A = np.zeros((nB, H, W))
    for i in range(n_local):
        for b in range(B):
            row = i * B + b
            q = local[row].reshape(C, -1).mean(1)
            q = q / max(np.sqrt((q ** 2).sum()), 1e-12)
            G = glob[view * B + b]
            for y in range(H):
                for x in range(W):
                    k = G[:, y, x]
                    A[row, y, x] = float(np.dot(k, q)) / max(math.sqrt(float(np.dot(k, k))), 1e-12)
            if softmax:
                e = np.exp(A[row] / T - (A[row] / T).max())
                A[row] = e / e.sum()
            S[row] = A[row][None] * G
    return torch.from_numpy(S).float(), torch.from_numpy(A).float()


def _rand(B, n, C, h, w, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n * B, C, h, w, generator=g), torch.randn(2 * B, C, H, W, generator=g)


def test_tiny_hand_computed():
    # one image, two local crops, C=3, a 2x2 teacher map with known numbers
    F0 = torch.tensor([[[1., 0.], [0., 1.]],
                       [[0., 2.], [0., 1.]],
                       [[0., 0.], [3., 0.]]])
    glob = torch.stack([F0, 7 * torch.ones(3, 2, 2)])           # view 1 must be ignored by default
    c0 = torch.tensor([2., 0., 0.]).view(3, 1, 1).expand(3, 2, 2)  # pooled (2,0,0) -> q=(1,0,0)
    c1 = torch.tensor([[[0., 0.], [0., 0.]],
                       [[6., 0.], [3., 3.]],
                       [[8., 0.], [4., 4.]]])                    # pooled (0,3,4) -> q=(0,.6,.8)
    local = torch.stack([c0, c1])
    r = 1 / math.sqrt(2)
    A_want = torch.tensor([[[1., 0.], [0., r]],
                           [[0., .6], [.8, .6 * r]]])
    S_want = torch.zeros(2, 3, 2, 2)
    S_want[0, :, 0, 0] = torch.tensor([1., 0., 0.])
    S_want[0, :, 1, 1] = torch.tensor([r, r, 0.])
    S_want[1, :, 0, 1] = torch.tensor([0., 1.2, 0.])
    S_want[1, :, 1, 0] = torch.tensor([0., 0., 2.4])
    S_want[1, :, 1, 1] = torch.tensor([.6 * r, .6 * r, 0.])
    for fn in (search_features, search_features_loop):
        S, A = fn(local, glob, 2)
        torch.testing.assert_close(A, A_want)
        torch.testing.assert_close(S, S_want)


def test_crop_major_pairing():
    # B=2 images with very different global maps: crop i of image b (row i*B+b) must use global row b
    B, n = 2, 3
    glob = torch.zeros(2 * B, 2, 1, 2)
    glob[0, :, 0, 0], glob[0, :, 0, 1] = torch.tensor([1., 0.]), torch.tensor([0., 5.])   # image 0, view 0
    glob[1, :, 0, 0], glob[1, :, 0, 1] = torch.tensor([0., 3.]), torch.tensor([2., 0.])   # image 1, view 0
    glob[2:] = -1.0                                                                        # view 1
    local = torch.zeros(n * B, 2, 1, 1)
    local[0::B, 0] = 1.0   # every crop of image 0 looks like channel 0
    local[1::B, 1] = 1.0   # every crop of image 1 looks like channel 1
    S, A = search_features(local, glob, n)
    for i in range(n):
        torch.testing.assert_close(A[i * B + 0], torch.tensor([[1., 0.]]))
        torch.testing.assert_close(A[i * B + 1], torch.tensor([[1., 0.]]))
        torch.testing.assert_close(S[i * B + 0], glob[0] * torch.tensor([[1., 0.]]))
        torch.testing.assert_close(S[i * B + 1], glob[1] * torch.tensor([[1., 0.]]))
    # an image-major (wrong) layout would pair row 1 (crop 0 of image 1) with image 0:
    assert not torch.allclose(S[1], glob[0] * A[1])


@pytest.mark.parametrize('B,n,C,h,w,H,W', [(3, 4, 6, 2, 2, 5, 5), (1, 2, 5, 3, 1, 3, 7), (2, 6, 16, 4, 4, 7, 7)])
@pytest.mark.parametrize('kw', [{}, {'softmax': True, 'temperature': 0.2}])
def test_matches_independent_reference(B, n, C, h, w, H, W, kw):
    local, glob = _rand(B, n, C, h, w, H, W)
    S_ref, A_ref = _reference(local, glob, n, softmax=kw.get('softmax', False), T=kw.get('temperature', 1.0))
    for fn in (search_features, search_features_loop):
        S, A = fn(local, glob, n, **kw)
        torch.testing.assert_close(A, A_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('B,n,C,h,w,H,W', [(4, 8, 32, 3, 3, 7, 7), (1, 2, 5, 2, 3, 5, 3), (3, 6, 64, 2, 2, 4, 4),
                                           (2, 1, 7, 1, 1, 9, 11)])
@pytest.mark.parametrize('kw', [{}, {'keys': 'both'}, {'softmax': True, 'temperature': 0.1},
                                {'softmax': True, 'keys': 'both', 'temperature': 2.0}])
def test_loop_equals_vectorised(B, n, C, h, w, H, W, kw):
    local, glob = _rand(B, n, C, h, w, H, W, seed=B * 100 + n)
    S1, A1 = search_features_loop(local, glob, n, **kw)
    S2, A2 = search_features(local, glob, n, **kw)
    V = 2 if kw.get('keys') == 'both' else 1
    assert S2.shape == (V * n * B, C, H, W) and A2.shape == (V * n * B, H, W)
    torch.testing.assert_close(A2, A1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S2, S1, atol=1e-5, rtol=1e-5)
    assert S2.is_contiguous()


def test_keys_both_order():
    B, n = 2, 3
    local, glob = _rand(B, n, 4, 2, 2, 3, 3)
    S, A = search_features(local, glob, n, keys='both')
    S_ref0, A_ref0 = _reference(local, glob, n, view=0)
    S_ref1, A_ref1 = _reference(local, glob, n, view=1)
    torch.testing.assert_close(S, torch.cat([S_ref0, S_ref1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A, torch.cat([A_ref0, A_ref1]), atol=1e-5, rtol=1e-5)


def test_cosine_range_and_softmax_normalised():
    local, glob = _rand(3, 4, 8, 2, 2, 6, 6)
    _, A = search_features(local, glob, 4)
    assert A.min() >= -1 - 1e-6 and A.max() <= 1 + 1e-6 and A.min() < 0 < A.max()
    _, As = search_features(local, glob, 4, softmax=True, temperature=0.07)
    torch.testing.assert_close(As.sum((1, 2)), torch.ones(12))
    assert (As >= 0).all()


def test_query_scale_invariance_and_raw_map():
    local, glob = _rand(2, 2, 8, 2, 2, 4, 4)
    S, A = search_features(local, glob, 2)
    S2, A2 = search_features(3.0 * local, glob, 2)        # query is L2-normalised
    torch.testing.assert_close(A2, A)
    S3, A3 = search_features(local, 2.0 * glob, 2)        # keys normalised, but the RAW map is re-weighted
    torch.testing.assert_close(A3, A)
    torch.testing.assert_close(S3, 2.0 * S)


def test_gradients():
    local, glob = _rand(2, 3, 4, 2, 2, 3, 3)
    local.requires_grad_(True)
    glob.requires_grad_(True)
    S, A = search_features(local, glob, 3)
    assert not A.requires_grad                      # keys and (by default) query carry no gradient
    S.sum().backward()
    assert local.grad is None                       # detached query
    torch.testing.assert_close(glob.grad[2:], torch.zeros_like(glob.grad[2:]))  # view 1 unused
    local.grad = None
    for fn in (search_features, search_features_loop):
        local.grad = None
        fn(local, glob, 3, detach_query=False)[0].pow(2).sum().backward()
        assert local.grad is not None and local.grad.abs().sum() > 0
    g1 = local.grad.clone(); local.grad = None
    search_features(local, glob, 3, detach_query=False)[0].pow(2).sum().backward()
    torch.testing.assert_close(local.grad, g1)


def test_channels_last_input():
    local, glob = _rand(2, 3, 16, 2, 2, 5, 5)
    S, A = search_features(local, glob, 3)
    Sc, Ac = search_features(local.to(memory_format=torch.channels_last), glob.to(memory_format=torch.channels_last), 3)
    torch.testing.assert_close(Sc, S)
    torch.testing.assert_close(Ac, A)


@pytest.mark.parametrize('args,match', [
    (((7, 4, 2, 2), (4, 4, 3, 3), 3), 'multiple'),
    (((6, 4, 2, 2), (6, 4, 3, 3), 3), '2\\*B'),
    (((6, 4, 2, 2), (4, 5, 3, 3), 3), 'channel'),
])
def test_bad_shapes(args, match):
    l, g, n = args
    with pytest.raises(ValueError, match=match):
        search_features(torch.randn(*l), torch.randn(*g), n)
    with pytest.raises(ValueError, match='keys'):
        search_features(torch.randn(6, 4, 2, 2), torch.randn(4, 4, 3, 3), 3, keys='second')


@pytest.mark.parametrize('kw', [{}, {'softmax': True, 'temperature': 0.5}])
def test_low_precision_keeps_dtype(kw):
    local, glob = _rand(2, 3, 16, 2, 2, 5, 5)
    S, A = search_features(local.bfloat16(), glob.bfloat16(), 3, **kw)
    Sl, Al = search_features_loop(local.bfloat16(), glob.bfloat16(), 3, **kw)
    S32, A32 = search_features(local, glob, 3, **kw)
    assert S.dtype == torch.bfloat16 and A.dtype == torch.bfloat16 and Sl.dtype == torch.bfloat16
    torch.testing.assert_close(S.float(), S32, atol=0.05, rtol=0.05)
    torch.testing.assert_close(Sl.float(), S32, atol=0.05, rtol=0.05)
