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


# --- mouse placement (ipyevents): events are dicts in the figure PNG's pixels, as the frontend sends them

def _event(w, kind, x, y):
    "The dict ipyevents sends for a mouse event at view-A pixel (x, y): dataX/dataY are PNG pixels (integers)."
    px, py = w.view_to_figure(x, y)
    return {'type': kind, 'dataX': round(px), 'dataY': round(py), 'button': 0}


def _send(w, *events):
    "Deliver events through ipyevents' own dispatcher (the path a frontend message takes), not to the handler directly."
    for e in events: w.mouse._handle_mouse_msg(None, e, None)


@pytest.fixture
def wm():
    return RegionMatch(image='scene', scene_index=4, view_size=64, seed=2)


def test_figure_mapping_matches_drawn_box(wm):
    "view_to_figure lands on the red query box drawn in the PNG, and inverts figure_to_view."
    from PIL import Image
    import io
    px = np.asarray(Image.open(io.BytesIO(wm.png)).convert('RGB')).astype(int)
    def red(x, y):
        u, v = (int(round(c)) for c in wm.view_to_figure(x, y))
        p = px[v - 1:v + 2, u - 1:u + 2].reshape(-1, 3)
        return int((p[:, 0] - p[:, 1:].max(1)).max())
    x0, y0, x1, y1 = wm.box
    assert red(x0, (y0 + y1) / 2) > 100 and red(x1, (y0 + y1) / 2) > 100 and red((x0 + x1) / 2, y0) > 100
    assert red((x0 + x1) / 2, (y0 + y1) / 2) < 60
    for x, y in ((0, 0), (64, 64), (13.5, 41)):
        assert np.allclose(wm.figure_to_view(*wm.view_to_figure(x, y)), (x, y))
    assert wm.figure_to_view(*wm.view_to_figure(70, 10)) is None and wm.figure_to_view(*wm.view_to_figure(10, -3)) is None


def test_click_centres_box_and_recomputes_once(wm):
    calls = []
    update = wm.update
    wm.update = lambda: (calls.append(1), update())[1]
    _send(wm, _event(wm, 'mousedown', 20, 44), _event(wm, 'mouseup', 20, 44))
    assert calls == [1]                                   # three sliders moved, one recompute
    assert (wm.x.value, wm.y.value, wm.size.value) == (4, 28, 32) and wm.box == (4, 28, 36, 60)
    assert 'query box (4, 28, 36, 60)' in wm.readout.value
    ref = _reference(wm)
    for l in LAYERS: torch.testing.assert_close(wm.maps[l], ref[l])


def test_click_near_border_and_outside(wm):
    _send(wm, _event(wm, 'mousedown', 2, 63), _event(wm, 'mouseup', 2, 63))
    assert wm.box == (0, 32, 32, 64)                      # shifted inside the view, size kept
    png = wm.png
    _send(wm, _event(wm, 'mousedown', 90, 30), _event(wm, 'mouseup', 90, 30))   # on view B's panel: ignored
    _send(wm, _event(wm, 'mouseup', 30, 30))                                      # a mouseup without a press
    assert wm.box == (0, 32, 32, 64) and wm.png == png


def test_drag_draws_square_box(wm):
    _send(wm, _event(wm, 'mousedown', 10, 20), _event(wm, 'mouseup', 34, 30))
    assert wm.box == (10, 20, 34, 44)                     # side = the larger extent of the drag (24)
    _send(wm, _event(wm, 'mousedown', 50, 40), _event(wm, 'mouseup', 38, 36))   # dragged up-left
    assert wm.box == (38, 28, 50, 40)
    _send(wm, _event(wm, 'mousedown', 58, 60), _event(wm, 'mouseup', 120, 62))  # released past the panel: x clipped to 64
    assert wm.box == (58, 58, 64, 64)                     # side max(6, 2) = 6; y shifted to stay inside
    ref = _reference(wm)
    for l in LAYERS: torch.testing.assert_close(wm.maps[l], ref[l])


def test_freeze_stops_mouse(wm):
    png, box = wm.png, wm.box
    wm.freeze()
    _send(wm, _event(wm, 'mousedown', 40, 40), _event(wm, 'mouseup', 40, 40))
    assert wm.box == box and wm.png == png
