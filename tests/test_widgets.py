import numpy as np
import pytest
import torch

from scfs.data import ScfsError
from scfs.search import search_features
from scfs.maps import LAYERS, best_location
from scfs.widgets import RegionMatch, crop_region, random_view

torch.set_num_threads(2)


@pytest.fixture(scope='module')
def w():
    return RegionMatch(image='scene', scene_index=0, view_size=64, seed=0)


def _reference(w):
    bb = w.backbone
    with torch.no_grad():
        q = crop_region(w.view_a, w.box, w.query_size)
        lf, gf = bb(q[None]), bb(torch.stack([w.view_b, w.view_a]))
    return {l: search_features(lf[l], gf[l], 1)[1][0] for l in LAYERS}


def test_initial_state(w):
    assert w.box == (16, 16, 48, 48)
    assert set(w.maps) == set(LAYERS) and w.maps['layer2'].shape == (16, 16) and w.maps['layer4'].shape == (4, 4)
    assert w.png[:8] == b'\x89PNG\r\n\x1a\n' and w.figure.value == w.png
    assert 'query box (16, 16, 48, 48)' in w.readout.value


def test_sliders_drive_box_maps_best(w):
    old = {l: m.clone() for l, m in w.maps.items()}
    old_png = w.png
    w.x.value, w.y.value, w.size.value = 30, 4, 20
    assert w.box == (30, 4, 50, 24)
    assert w.png != old_png and 'query box (30, 4, 50, 24)' in w.readout.value
    assert any(not torch.allclose(old[l], w.maps[l]) for l in LAYERS)
    ref = _reference(w)
    for l in LAYERS:
        torch.testing.assert_close(w.maps[l], ref[l])
        loc, sim = best_location(ref[l], w.view_size)
        assert w.best[l] == loc and abs(w.sims[l] - sim) < 1e-6
        assert f'{sim:.3f}' in w.readout.value


def test_box_clipped_at_border(w):
    w.x.value, w.size.value = 60, 40
    assert w.box[2] == 64 and w.query.shape == (3, w.query_size, w.query_size)


def test_resample_changes_views_and_keeps_consistency(w):
    va = w.view_a.clone()
    w.resample_button.click()
    assert not torch.equal(va, w.view_a)
    ref = _reference(w)
    for l in LAYERS: torch.testing.assert_close(w.maps[l], ref[l])


def test_freeze_stops_updates():
    w2 = RegionMatch(image='scene', scene_index=1, view_size=64, seed=1)
    png = w2.png
    w2.freeze()
    w2.x.value = 30
    assert w2.png == png and w2.box == (30, 16, 62, 48)  # box follows the slider, the display does not


def test_image_sources_and_bad_checkpoint(tmp_path):
    w3 = RegionMatch(image='scene', scene_index=2, view_size=64, seed=0)
    assert w3.source.value == 'scene (by index)' and w3.scene_index.value == 2   # the controls show the image
    w3.source.value = 'scene (by index)'; w3.scene_index.value = 5
    w3.load_button.click()
    assert w3.image_name == 'scene 5' and w3.status.value == ''
    w3.source.value = 'path'; w3.path.value = str(tmp_path / 'missing.png')
    w3.load_button.click()
    assert 'not found' in w3.status.value and w3.image_name == 'scene 5'
    w3.backbone_choice.value = 'checkpoint'; w3.checkpoint.value = str(tmp_path / 'nope.pth')
    w3.backbone_button.click()
    assert 'not found' in w3.status.value
    with pytest.raises(ScfsError): w3.load_backbone(tmp_path / 'nope.pth')


def test_random_view_reproducible():
    from PIL import Image
    img = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    a = random_view(img, 48, gen=torch.Generator().manual_seed(3))
    b = random_view(img, 48, gen=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    x0, y0, x1, y1 = a[1]
    assert 0 <= x0 < x1 <= 70 and 0 <= y0 < y1 <= 50


def test_checkpoint_backbone(tmp_path):
    "Switching to a saved backbone (an exported state_dict) gives that backbone's maps."
    from scfs.backbone import build_backbone, backbone_state_dict_for_export
    torch.manual_seed(123)
    bb = build_backbone('small')
    with torch.no_grad():
        for p in bb.parameters(): p.add_(0.05 * torch.randn_like(p))
    ck = tmp_path / 'bb.pth'
    torch.save(backbone_state_dict_for_export(bb), ck)
    w4 = RegionMatch(image='scene', scene_index=3, view_size=64, seed=0)
    before = {l: m.clone() for l, m in w4.maps.items()}
    w4.backbone_choice.value = 'checkpoint'; w4.checkpoint.value = str(ck)
    w4.backbone_button.click()
    assert w4.status.value == '' and w4.backbone_name == 'bb.pth'
    bb.eval()
    with torch.no_grad():
        q = crop_region(w4.view_a, w4.box, w4.query_size)
        lf, gf = bb(q[None]), bb(torch.stack([w4.view_b, w4.view_a]))
    for l in LAYERS:
        torch.testing.assert_close(w4.maps[l], search_features(lf[l], gf[l], 1)[1][0])
    assert any(not torch.allclose(before[l], w4.maps[l]) for l in LAYERS)
    w4.backbone_choice.value = 'random init'; w4.backbone_button.click()
    for l in LAYERS: torch.testing.assert_close(w4.maps[l], before[l])   # same seed -> same random init
