import math, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from scfs.backbone import build_backbone
from scfs.data import ScfsError, make_scene
from scfs.search import search_features
from scfs.maps import (attention_on_object, box_fraction_map, source_to_view, view_to_source, clip_box, search_maps,
                       sample_views, best_location, object_scores, load_image, maps_figure, add_cli, LAYERS)

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


def test_object_scores_runs_and_counts():
    torch.manual_seed(0)
    r = object_scores(build_backbone('small'), n_images=3, n_local=3)
    assert r['rows'] and sum(n for _, n in r['summary'].values()) == len(r['rows'])
    assert all(s['score'] >= 0 for s in r['rows'])
    assert {row['kind'] for row in r['rows']} <= {'on', 'off'}


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
