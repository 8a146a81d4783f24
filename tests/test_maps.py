import math, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from scfs.backbone import build_backbone
from scfs.core import ScfsError
from scfs.shapes import make_scene
from scfs.search import search_features
import scfs.scores
from scfs.maps import (source_to_view, view_to_source, clip_box, search_maps, sample_views, best_location, load_image,
                       maps_figure, add_cli, LAYERS)
from scfs.scores import (attention_on_object, box_fraction_map, object_scores, map_auroc, box_mask, bootstrap_ci,
                         crop_kind, scene_split, object_auroc, format_auroc)

torch.set_num_threads(2)


def test_score_all_mass_in_box_is_inverse_share():
    m = torch.zeros(8, 8); m[2:4, 2:6] = 3.0        # cells of 8 px -> exactly the box (16,16)-(48,32)
    share = (32 * 16) / 64 ** 2
    assert math.isclose(attention_on_object(m, (16, 16, 48, 32), 64), 1 / share)


@pytest.mark.parametrize('shape,box', [((8, 8), (16, 16, 48, 32)), ((5, 7), (3.3, 10.1, 41.7, 55.0)),
                                       ((4, 4), (-10, -10, 20, 70))])
def test_score_uniform_is_one(shape, box):
    assert math.isclose(attention_on_object(torch.ones(shape), box, 64), 1.0)


def test_score_mass_outside_and_negatives():
    m = torch.zeros(8, 8); m[7, 7] = 1.0; m[3, 3] = -9.0   # negative values do not count as mass
    assert attention_on_object(m, (16, 16, 48, 32), 64) == 0.0
    assert math.isnan(attention_on_object(torch.ones(4, 4), (70, 70, 90, 90), 64))
    assert math.isnan(attention_on_object(-torch.ones(4, 4), (0, 0, 32, 32), 64))


def test_score_mean_baseline():
    m = torch.zeros(8, 8); m[2:4, 2:6] = 3.0
    assert math.isclose(attention_on_object(m, (16, 16, 48, 32), 64, baseline='mean'), 8.0)
    assert math.isnan(attention_on_object(torch.ones(8, 8), (16, 16, 48, 32), 64, baseline='mean'))  # no mass above mean
    grad = torch.linspace(0.5, 1, 8)[None].repeat(8, 1)   # all positive, rising to the right
    z, c = attention_on_object(grad, (32, 0, 64, 64), 64), attention_on_object(grad, (32, 0, 64, 64), 64, 'mean')
    assert 1 < z < c <= 2
    with pytest.raises(ValueError): attention_on_object(m, (0, 0, 8, 8), 64, baseline='max')


def test_box_fraction_partial_cells():
    f = box_fraction_map((2, 2), (0, 0, 48, 16), 64)
    torch.testing.assert_close(f, torch.tensor([[0.5, 0.25], [0.0, 0.0]], dtype=torch.float64))


def test_coordinates_with_flip():
    vb = (10, 20, 50, 60)
    assert source_to_view((10, 20, 30, 40), vb, False, 80) == (0, 0, 40, 40)
    assert source_to_view((10, 20, 30, 40), vb, True, 80) == (40, 0, 80, 40)
    b = (12.5, 22.0, 44.0, 59.0)
    for flip in (False, True):
        np.testing.assert_allclose(view_to_source(source_to_view(b, vb, flip, 80), vb, flip, 80), b)
    assert clip_box((70, 0, 90, 5), 64) is None


def test_search_maps_equal_search_features():
    torch.manual_seed(0)
    bb = build_backbone('small')
    g, loc = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 32, 32)
    maps = search_maps(bb, loc, g)
    assert bb.training  # caller's mode restored
    bb.eval()
    with torch.no_grad():
        lf, gf = bb(loc), bb(g)
    for l in LAYERS:
        torch.testing.assert_close(maps[l], search_features(lf[l], gf[l], 3)[1])
    (x, y), v = best_location(maps['layer2'][0], 64)
    assert math.isclose(v, float(maps['layer2'][0].max()))


def test_flipped_view_object_box_tracks_object():
    "The object box mapped into a (possibly flipped) view covers the object's pixels in that view."
    img, _, box = make_scene(np.random.default_rng(5), size=64)
    arr = np.zeros((64, 64, 3), np.uint8); x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    mask = Image.fromarray(arr)
    for seed in range(6):
        v = sample_views(mask, seed=seed, n_local=1)
        vb, flip = v['boxes'][0].tolist(), bool(v['flips'][0])
        b = clip_box(source_to_view(box, vb, flip, 64), 64)
        white = v['globals'][0][0] > 0.5               # normalised red channel of white pixels is high
        if b is None: assert white.float().mean() < 0.02; continue
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[int(math.ceil(b[1])):int(b[3]), int(math.ceil(b[0])):int(b[2])] = True
        assert white[inside].float().mean() > 0.9 and white[~inside].float().mean() < 0.1, (seed, flip)


def _scores_with_box_maps(monkeypatch, kind, **kw):
    """`object_scores` with search maps made from each image's own object box in global view 0: 'uniform' (1
    everywhere), 'inside' (1 on the cells wholly inside the box) or 'outside' (1 on the cells wholly outside).
    Returns (result, the object box in view 0 of each image, in order)."""
    cur, views = {}, []
    real_iter, real_views = scfs.scores._scene_iter, scfs.scores.sample_views
    def scene_iter(*a, **k):
        for img, obj in real_iter(*a, **k): cur['obj'] = obj; yield img, obj
    def sample(*a, **k): cur['v'] = real_views(*a, **k); return cur['v']
    def fake(backbone, local_crops, global_views, layers=LAYERS, **_):
        v, S = cur['v'], cur['v']['global_size']
        views.append(source_to_view(cur['obj'], v['boxes'][0].tolist(), bool(v['flips'][0]), S))
        f = {l: box_fraction_map((S // s, S // s), views[-1], S) for l, s in zip(layers, (4, 8, 16))}
        pick = dict(uniform=lambda x: torch.ones_like(x), inside=lambda x: (x == 1).double(), outside=lambda x: (x == 0).double())
        return {l: pick[kind](x).float()[None].repeat(len(local_crops), 1, 1) for l, x in f.items()}
    monkeypatch.setattr(scfs.scores, '_scene_iter', scene_iter)
    monkeypatch.setattr(scfs.scores, 'sample_views', sample)
    monkeypatch.setattr(scfs.scores, 'search_maps', fake)
    return object_scores(None, **kw), views


@pytest.mark.parametrize('kind', ['uniform', 'inside', 'outside'])
def test_object_scores_of_maps_made_from_the_box(monkeypatch, kind):
    """The score of a map with no preference is 1, of a map on the object's cells 1 / the box's share of the view, of
    a map off the object 0: on every crop and layer (was: score >= 0, true of any map)."""
    r, views = _scores_with_box_maps(monkeypatch, kind, n_images=6, n_local=4)
    assert r['rows'] and {row['kind'] for row in r['rows']} == {'on', 'off'}
    S = 64
    for row in r['rows']:
        shape = {l: (S // s, S // s) for l, s in zip(LAYERS, (4, 8, 16))}[row['layer']]
        share = float(box_fraction_map(shape, views[row['image']], S).mean())
        want = {'uniform': 1.0, 'inside': 1 / share, 'outside': 0.0}[kind]
        assert row['score'] == pytest.approx(want, rel=1e-9, abs=1e-12), row
    assert sum(n for _, n in r['summary'].values()) == len(r['rows'])
    for (l, k), (mean, n) in r['summary'].items():
        xs = [row['score'] for row in r['rows'] if (row['layer'], row['kind']) == (l, k)]
        assert n == len(xs) and (mean == pytest.approx(np.mean(xs)) if xs else math.isnan(mean))


def test_load_image_and_errors(tmp_path):
    img, box = load_image('scene:2')
    assert img.size == (64, 64) and len(box) == 4
    with pytest.raises(ScfsError): load_image(tmp_path / 'missing.png')
    with pytest.raises(ScfsError): load_image('scene:x')


def test_cli_writes_figure(tmp_path):
    import argparse
    ap = argparse.ArgumentParser(); add_cli(ap.add_subparsers())
    a = ap.parse_args(['maps', '--image', 'scene:1', '--out', str(tmp_path / 'f.png'), '--n-local', '2', '--seed', '3'])
    assert a.func(a) == 0
    assert Image.open(tmp_path / 'f.png').size[0] > 100
    with pytest.raises(ScfsError):
        maps_figure('scene:1', checkpoint=tmp_path / 'nope.pth', out=tmp_path / 'g.png')


# ---- on-object AUROC ----

def _brute_auroc(s, m):
    "Pairwise count: P(object > background) + P(tie)/2."
    d = s[m][:, None] - s[~m][None, :]
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def test_map_auroc_extremes_and_floor():
    m = torch.zeros(5, 6, dtype=torch.bool); m[1:4, 2:5] = True
    assert map_auroc(m.float(), m) == 1.0
    assert map_auroc(-m.float(), m) == 0.0                      # a swapped-class implementation gives 1 here
    assert map_auroc(torch.full((5, 6), 0.7), m) == 0.5         # flat map: all ties -> 0.5, not 0 or 1
    assert map_auroc(np.where(m.numpy(), 2.0, 1.0), m.numpy()) == 1.0   # numpy in, too


def test_map_auroc_ties_by_hand():
    # object [3, 2], background [2, 1, 0]: 5 wins and one tie out of 6 pairs
    s, m = torch.tensor([3., 2., 2., 1., 0.]), torch.tensor([True, True, False, False, False])
    assert math.isclose(map_auroc(s, m), 5.5 / 6)               # ties ignored: 5/6; ties as wins: 1; swapped: 0.5/6
    assert math.isclose(map_auroc(s, ~m), 0.5 / 6)
    # a single tie group spanning both classes: object [1, 1, 0], background [1, 0]
    assert math.isclose(map_auroc(torch.tensor([1., 1., 0., 1., 0.]), torch.tensor([1, 1, 1, 0, 0]).bool()),
                        (0.5 + 1 + 0.5 + 1 + 0 + 0.5) / 6)


def test_map_auroc_matches_pairwise_count():
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        levels = 3 if trial % 2 else 1000                         # many ties / almost none
        s = torch.randint(0, levels, (6, 7), generator=g).float()
        m = torch.rand(6, 7, generator=g) < 0.35
        if m.all() or not m.any(): continue
        assert math.isclose(map_auroc(s, m), _brute_auroc(s, m), abs_tol=1e-12)


def test_map_auroc_undefined_and_errors():
    assert math.isnan(map_auroc(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool)))
    assert math.isnan(map_auroc(torch.ones(3, 3), torch.zeros(3, 3, dtype=torch.bool)))
    x = torch.ones(2, 2); x[0, 0] = float('nan')
    assert math.isnan(map_auroc(x, torch.eye(2, dtype=torch.bool)))
    with pytest.raises(ValueError): map_auroc(torch.ones(2, 2), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError): map_auroc(torch.ones(2, 2), torch.eye(2))   # a float mask is a mistake


def test_box_mask_and_crop_kind():
    assert box_mask((8, 8), (16, 16, 48, 32), 64).sum() == 8
    assert box_mask((2, 2), (0, 0, 48, 16), 64).tolist() == [[True, False], [False, False]]
    assert crop_kind((0, 0, 10, 10), (20, 20, 40, 40)) == 'off'
    assert crop_kind((25, 25, 35, 35), (20, 20, 40, 40)) == 'on'
    assert crop_kind((15, 15, 25, 25), (20, 20, 40, 40)) is None


def test_bootstrap_ci():
    lo, hi = bootstrap_ci([3.0, 1.0, 2.0, 2.5], [4, 2, 3, 5], seed=3)
    assert lo < 8.5 / 14 < hi and (lo, hi) == bootstrap_ci([3.0, 1.0, 2.0, 2.5], [4, 2, 3, 5], seed=3)
    assert bootstrap_ci([2.0, 2.0], [4, 4]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in bootstrap_ci([1.0], [2]))


def test_scene_split_fallback(tmp_path):
    (tmp_path / 'boxes.json').write_text('{"train/a/0.png": [0, 0, 4, 4], "test/a/0.png": [0, 0, 4, 4]}')
    assert scene_split(tmp_path, 'val') == 'test' and scene_split(tmp_path, 'train') == 'train'
    with pytest.raises(ScfsError): scene_split(tmp_path, 'other')
    with pytest.raises(ScfsError): scene_split(tmp_path / 'nowhere', 'val')


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    from scfs.data import generate_scenes
    d = tmp_path_factory.mktemp('auroc') / 'scenes'
    generate_scenes(d, n_train=20, n_test=10, seed=0, workers=1)
    return d


def test_object_auroc_random_init_rows_recomputed(scenes):
    """Every row of the first images recomputed from the pieces (the seeded choice of val scenes, their views, the
    search maps, the object's cells in view 0, map_auroc), and the summary from the rows by hand (was: ranges)."""
    import json
    torch.manual_seed(0)
    bb, kw = build_backbone('small'), dict(n_local=4, global_size=32, local_size=16)
    r = object_auroc(bb, scenes, n_images=8, n_boot=200, **kw)
    assert r['split'] == ('val' if (scenes / 'val').is_dir() else 'test') and r['rows']
    boxes = json.loads((scenes / 'boxes.json').read_text())
    keys = sorted(k for k in boxes if k.startswith(r['split'] + '/'))
    keys = [keys[j] for j in np.random.default_rng(0).permutation(len(keys))]      # object_auroc's seeded choice
    for i in range(3):
        img, obj = Image.open(scenes / keys[i]).convert('RGB'), boxes[keys[i]]
        v = sample_views(img, seed=i, **kw)
        S = v['global_size']
        ov = source_to_view(obj, v['boxes'][0].tolist(), bool(v['flips'][0]), S)
        want = []
        if clip_box(ov, S) is not None:
            maps = search_maps(bb, v['locals'], v['globals'])
            for k in range(4):
                kind = crop_kind(v['boxes'][2 + k].tolist(), obj)
                for l in LAYERS if kind else ():
                    a = map_auroc(maps[l][k], box_mask(tuple(maps[l][k].shape), ov, S))
                    if not math.isnan(a): want.append((k, kind, l, a))
        got = [(x['crop'], x['kind'], x['layer'], x['auroc']) for x in r['rows'] if x['image'] == i]
        assert [g[:3] for g in got] == [w[:3] for w in want], i
        np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], rtol=1e-9)
    for l, s in r['summary'].items():
        for kind in ('on', 'off'):
            xs = [x for x in r['rows'] if x['layer'] == l and x['kind'] == kind]
            assert s[f'n_{kind}'] == len(xs) and s[f'img_{kind}'] == len({x['image'] for x in xs})
            assert s[kind] == pytest.approx(np.mean([x['auroc'] for x in xs])) if xs else math.isnan(s[kind])
    assert 'layer2 on' in format_auroc({'random': r})


def _spy_maps(monkeypatch, sign):
    "Replace the search maps by the object's cover fraction (times `sign`) of the global view being scored."
    seen = {}
    def spy(box, view_box, flip, size):
        seen['obj'], seen['S'] = source_to_view(box, view_box, flip, size), size
        return seen['obj']
    def fake(backbone, local_crops, global_views, layers=LAYERS, **kw):
        K, S = local_crops.shape[0], seen['S']
        return {l: sign * box_fraction_map((S // s, S // s), seen['obj'], S).float()[None].repeat(K, 1, 1)
                for l, s in zip(layers, (4, 8, 16))}
    monkeypatch.setattr(scfs.scores, 'source_to_view', spy)
    monkeypatch.setattr(scfs.scores, 'search_maps', fake)


@pytest.mark.parametrize('sign,expect', [(1, 1.0), (-1, 0.0), (0, 0.5)])
def test_object_auroc_informative_map(scenes, monkeypatch, sign, expect):
    "A map that is the object (or its reverse, or flat) scores exactly 1 (0, 0.5) on every crop and layer."
    _spy_maps(monkeypatch, sign)
    r = object_auroc(None, scenes, n_images=6, n_local=4, global_size=64, local_size=32, n_boot=100)
    assert r['rows'] and all(x['auroc'] == expect for x in r['rows'])
    assert any(x['kind'] == 'on' for x in r['rows'])          # crops that hold the object were scored
    for s in r['summary'].values():
        assert s['on'] == expect and s['ci_on'] == (expect, expect)


def test_object_auroc_shuffled_control(scenes):
    "Shuffling each map's cells keeps its values but not their place: on average the floor 0.5."
    torch.manual_seed(0)
    r = object_auroc(build_backbone('small'), scenes, n_images=10, n_local=6, global_size=64, local_size=32,
                     n_boot=100, shuffle_maps=True)
    a = np.array([x['auroc'] for x in r['rows'] if x['layer'] == 'layer2'])
    assert abs(a.mean() - 0.5) < 0.08
