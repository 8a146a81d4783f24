"Tests for scfs.augment: MultiCrop shapes, determinism, boxes that reproduce crops, collate order, eval transform."
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from scfs.augment import MultiCrop, multicrop_collate, eval_transform, denormalize, IMAGENET_MEAN, IMAGENET_STD
from scfs.shapes import make_scene
from scfs.images import load_photo


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "Per-crop ops on small images are 10-50x slower with 2 intra-op threads on a busy machine (as in a DataLoader worker)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def photo():
    return load_photo('coffee')


def test_shapes_dtypes_and_scales(photo):
    mc = MultiCrop(64, 32, n_local=5)
    torch.manual_seed(0)
    o = mc(photo)
    assert mc.n_crops == 7 and len(o['crops']) == 7
    assert [tuple(c.shape) for c in o['crops']] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 5
    assert all(c.dtype == torch.float32 for c in o['crops'])
    assert o['boxes'].shape == (7, 4) and o['boxes'].dtype == torch.float32 and o['flips'].dtype == torch.bool
    W, H = photo.size
    b = o['boxes']
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    torch.manual_seed(1)
    areas = torch.cat([(lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (W * H))(mc(photo)['boxes']) for _ in range(20)]).view(20, 7)
    assert areas[:, :2].min() > 0.24 and areas[:, 2:].max() < 0.26 and areas[:, 2:].min() > 0.045
    assert areas[:, :2].mean() > areas[:, 2:].mean() * 2


def test_same_seed_same_crops(photo):
    mc = MultiCrop(48, 24, n_local=3)
    torch.manual_seed(5); a = mc(photo)
    torch.manual_seed(5); b = mc(photo)
    torch.manual_seed(6); c = mc(photo)
    assert all(torch.equal(x, y) for x, y in zip(a['crops'], b['crops']))
    assert torch.equal(a['boxes'], b['boxes']) and torch.equal(a['flips'], b['flips'])
    assert not torch.equal(a['boxes'], c['boxes'])


@pytest.mark.parametrize('source', ['photo', 'scene'])
def test_box_reproduces_crop(photo, source):
    img = photo if source == 'photo' else make_scene(np.random.default_rng(1), 64)[0]
    mc = MultiCrop(56, 28, n_local=6, photometric=False)
    torch.manual_seed(2)
    src = F.pil_to_tensor(img)
    seen_flip = set()
    for _ in range(3):
        o = mc(img)
        for c, box, fl in zip(o['crops'], o['boxes'].tolist(), o['flips'].tolist()):
            x0, y0, x1, y1 = map(int, box)
            ref = F.resized_crop(src, y0, x0, y1 - y0, x1 - x0, [c.shape[-1]] * 2,
                                 interpolation=F.InterpolationMode.BICUBIC, antialias=True)
            if fl: ref = F.horizontal_flip(ref)
            ref = F.normalize(F.to_dtype(ref, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
            torch.testing.assert_close(c, ref)
            # independent check with PIL: crop + bicubic resize
            pil = img.crop((x0, y0, x1, y1)).resize((c.shape[-1],) * 2, Image.BICUBIC)
            if fl: pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
            pil = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
            assert (denormalize(c) - pil).abs().mean() < 0.02
            seen_flip.add(fl)
    assert seen_flip == {True, False}


def test_photometric_changes_pixels_not_geometry(photo):
    torch.manual_seed(0); a = MultiCrop(56, 28, 2, photometric=False)(photo)
    torch.manual_seed(0); b = MultiCrop(56, 28, 2, photometric=True)(photo)
    assert torch.equal(a['boxes'][0], b['boxes'][0])                       # first crop sampled before any photometric op
    assert (a['crops'][0] - b['crops'][0]).abs().mean() > 0.01             # global 1 is always blurred


def test_blur_sigma_scales_with_crop_size():
    small, big = MultiCrop(56, 28), MultiCrop(224, 96)
    blur = lambda c: c.transforms[-1]
    assert blur(big.global1).sigma == pytest.approx((0.1, 2.0)) and blur(big.local).sigma == pytest.approx((0.1, 2.0))
    assert blur(small.global1).sigma == pytest.approx((0.025, 0.5)) and blur(small.local).sigma[1] == pytest.approx(2.0 * 28 / 96)
    assert blur(small.global1).p == 1.0 and small.global2.transforms[-2].p == 0.1 and blur(small.local).p == 0.5


def test_tiny_and_odd_images():
    for im in [Image.new('RGB', (1, 1), (0, 255, 0)), Image.new('RGBA', (5, 3)), Image.new('L', (10, 200)), Image.new('P', (7, 7))]:
        o = MultiCrop(32, 16, 2)(im)
        assert [c.shape[-1] for c in o['crops']] == [32, 32, 16, 16]
        assert (o['boxes'][:, 2] <= im.size[0]).all() and (o['boxes'][:, 3] <= im.size[1]).all()
        assert torch.isfinite(torch.stack([c.sum() for c in o['crops']])).all()


def test_collate_is_crop_major():
    mc = MultiCrop(40, 20, n_local=4)
    imgs = [make_scene(np.random.default_rng(i), 48)[0] for i in range(3)]
    torch.manual_seed(0); outs = [mc(im) for im in imgs]
    batch = multicrop_collate([(o, k) for k, o in enumerate(outs)])
    assert [tuple(c.shape) for c in batch['crops']] == [(3, 3, 40, 40)] * 2 + [(3, 3, 20, 20)] * 4
    assert batch['boxes'].shape == (3, 6, 4) and batch['flips'].shape == (3, 6)
    assert batch['labels'].dtype == torch.long and batch['labels'].tolist() == [0, 1, 2]
    locs, globs = torch.cat(batch['crops'][2:]), torch.cat(batch['crops'][:2])
    assert torch.equal(locs[0], outs[0]['crops'][2]) and torch.equal(locs[1], outs[1]['crops'][2])
    assert torch.equal(locs[3], outs[0]['crops'][3]) and torch.equal(locs[11], outs[2]['crops'][5])
    assert torch.equal(globs[4], outs[1]['crops'][1])
    assert torch.equal(batch['boxes'][2], outs[2]['boxes'])


def test_dataloader_workers(tmp_path):
    from scfs.data import generate_scenes
    from scfs.images import ImageDataset
    out = generate_scenes(tmp_path / 's', 8, 0, size=32, workers=0)
    dl = torch.utils.data.DataLoader(ImageDataset(out / 'train', transform=MultiCrop(28, 14, 2)), batch_size=4,
                                     num_workers=1, collate_fn=multicrop_collate)
    batches = list(dl)
    assert len(batches) == 2 and batches[0]['crops'][2].shape == (4, 3, 14, 14)


def test_eval_transform(photo):
    t = eval_transform(56)
    x = t(make_scene(np.random.default_rng(0), 64)[0])
    assert type(x) is torch.Tensor and x.shape == (3, 56, 56) and x.dtype == torch.float32
    # deterministic, centred: equals resize(64) + centre crop 56 by hand
    ref = F.center_crop(F.resize(F.pil_to_tensor(make_scene(np.random.default_rng(0), 64)[0]), 64,
                                 interpolation=F.InterpolationMode.BICUBIC, antialias=True), 56)
    ref = F.normalize(F.to_dtype(ref, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(x, ref)
    y = eval_transform(224)(photo)
    assert y.shape == (3, 224, 224) and abs(denormalize(y).mean().item() - np.asarray(photo).mean() / 255) < 0.08
    assert eval_transform(32)(Image.new('RGBA', (1, 1))).shape == (3, 32, 32)


def test_object_fraction():
    from scfs.augment import object_fraction
    crops = torch.tensor([[0., 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [2, 0, 4, 10]])
    torch.testing.assert_close(object_fraction(crops, (0, 0, 10, 10)), torch.tensor([1., .25, 0., .2]))
    assert object_fraction(crops[None], (0, 0, 10, 10)).shape == (1, 4)


def test_clutter_levels_order_the_share_of_object_free_local_crops():
    "More clutter (smaller objects) must mean more local crops that miss the object: the x-axis of the clutter study."
    from scfs.augment import clutter_stats
    from scfs.shapes import CLUTTER, DEFAULT_CLUTTER
    assert DEFAULT_CLUTTER in CLUTTER
    s = {l: clutter_stats(l, n=60, scale=(0.1, 0.4)) for l in ('low', 'medium', 'high')}
    assert s['low']['object_area'] > s['medium']['object_area'] > s['high']['object_area']
    assert s['low']['object_free'] < s['medium']['object_free'] < s['high']['object_free']
    assert all(0 <= v['no_object'] <= v['object_free'] <= 1 for v in s.values())


@pytest.mark.parametrize('kind', ['MultiCrop', 'BatchMultiCrop'])
def test_channel_scramble_reaches_both_loaders(kind):
    """The config's p_shuffle / p_invert reach the crops of both loaders: with p_invert=1 and no other photometric op,
    the first global view is the inverted view of the same box (same seed; later crops draw from a shifted stream)."""
    from scfs.config import get_config
    from scfs.loader import views_for
    from scfs.augment import BatchMultiCrop
    plain = dict(jitter=(0.0, 0.0, 0.0, 0.0), p_jitter=0.0, p_grey=0.0, blur_sigma=(1e-6, 1e-6))
    cls = MultiCrop if kind == 'MultiCrop' else BatchMultiCrop
    off, on = (views_for(get_config('tiny', **plain, p_shuffle=0.0, p_invert=p), cls) for p in (0.0, 1.0))
    img = make_scene(np.random.default_rng(0), 64)[0]
    if kind == 'MultiCrop':
        torch.manual_seed(1); a = off(img)
        torch.manual_seed(1); b = on(img)
    else:
        u8 = F.pil_to_tensor(img)[None]
        a, b = (v(u8, torch.Generator().manual_seed(1)) for v in (off, on))
    m, s = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(a['boxes'][..., 0, :], b['boxes'][..., 0, :])
    ca, cb = (c[0] if kind == 'MultiCrop' else c[0][0] for c in (a['crops'], b['crops']))
    torch.testing.assert_close(cb * s + m, 1 - (ca * s + m), atol=1e-5, rtol=0)
