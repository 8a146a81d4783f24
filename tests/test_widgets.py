import numpy as np
import pytest
import torch

from scfs.data import ScfsError
from scfs.search import search_features
from scfs.backbone import LAYERS
from scfs.maps import best_location
from scfs.augment import random_resized_boxes
from scfs.maps import source_to_view
from scfs.widgets import (QueryBox, RegionMatch, RegionQuery, crop_region, cut_view, random_view, region_search,
                          render_region_match)

torch.set_num_threads(2)


# --- the query box and the search, without widgets

class Counted(QueryBox):
    "A QueryBox that counts the searches its hook would run."
    searches = 0
    def search(self): self.searches += 1


def test_query_box_moves():
    b = Counted(64)
    assert b.box == (16, 16, 48, 48)
    b.move(60, 4, 40); assert b.box == (60, 4, 64, 44)              # the sliders: clipped, not shifted
    b.place(60, 4); assert b.box == (24, 4, 64, 44)                 # the mouse: shifted inside, side kept
    b.place(-5, 3, 2); assert b.box == (0, 3, 4, 7)                 # side clamped to min_side
    b.centre_on(2, 63); assert b.box == (0, 60, 4, 64)
    b.drag((10, 20), (34, 30)); assert b.box == (10, 20, 34, 44)    # side = the larger extent of the drag (24)
    b.drag((50, 40), (38, 36)); assert b.box == (38, 28, 50, 40)    # dragged up-left
    b.drag((20, 20), (21.5, 19)); assert b.box == (16, 13, 28, 25)  # under 2 px: a click, centred, side 12 kept
    assert b.searches == 7


@pytest.mark.parametrize('bad', [(-1, 0, 8), (0, 61, 8), (0, 0, 3), (0, 0, 65), (float('nan'), 0, 8)])
def test_query_box_rejects_off_view_moves(bad):
    b = Counted(64)
    with pytest.raises(ScfsError, match='does not fit'): b.move(*bad)
    assert b.box == (16, 16, 48, 48) and b.searches == 0


@pytest.fixture(scope='module')
def rq():
    return RegionQuery(image='scene', scene_index=0, view_size=64, seed=0)


def test_region_query_move_changes_box_and_maps(rq):
    rq.move(16, 16, 32)
    old = {l: m.clone() for l, m in rq.maps.items()}
    rq.move(30, 4, 20)
    assert rq.box == (30, 4, 50, 24) and rq.query.shape == (3, rq.query_size, rq.query_size)
    assert all(not torch.allclose(old[l], rq.maps[l]) for l in LAYERS)
    ref = _reference(rq)
    for l in LAYERS:
        torch.testing.assert_close(rq.maps[l], ref[l])
        loc, sim = best_location(ref[l], 64)
        assert rq.best[l] == loc and abs(rq.sims[l] - sim) < 1e-6


def test_region_query_resample_and_backbone(rq, tmp_path):
    va, feats = rq.view_a.clone(), rq.global_feats
    rq.resample()
    assert not torch.equal(va, rq.view_a) and rq.global_feats is not feats
    ref = _reference(rq)
    for l in LAYERS: torch.testing.assert_close(rq.maps[l], ref[l])
    with pytest.raises(ScfsError, match='not found'): rq.load_backbone(tmp_path / 'nope.pth')
    for l in LAYERS: torch.testing.assert_close(rq.maps[l], ref[l])        # a failed load changes nothing


@pytest.mark.parametrize('kw', [dict(view_size=8), dict(view_size=64.0), dict(query_size=4), dict(scale=(0.5, 0.2)),
                                dict(scale=(0, 1)), dict(scale=0.5), dict(scale=(0.1, 0.2, 0.3)),
                                dict(layers=('layer5',)), dict(layers=()), dict(image='no/such/image.png')])
def test_region_query_invalid_input(kw):
    with pytest.raises(ScfsError):
        RegionQuery(**{'image': 'scene', **kw})


def checker_image(obj=(12, 16, 36, 40), size=96, seed=0):
    "Grey, slightly noisy image with a red/blue checkered square at `obj`."
    from PIL import Image
    a = np.random.default_rng(seed).normal(128, 6, (size, size, 3))
    x0, y0, x1, y1 = obj
    yy, xx = np.mgrid[y0:y1, x0:x1]
    a[y0:y1, x0:x1] = np.where(((yy // 6 + xx // 6) % 2)[..., None] == 0, [220, 30, 30], [30, 30, 220])
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _inside(p, b): return b[0] <= p[0] <= b[2] and b[1] <= p[1] <= b[3]


@pytest.mark.parametrize('backbone', ['tiny-scfs', 'tiny-dino'])
def test_best_match_lands_on_the_region_in_view_b(backbone):
    "A query cut from view A around the square is found at layer2 inside the square's place in (flipped) view B."
    obj = (12, 16, 36, 40)
    q = RegionQuery(image=checker_image(obj), backbone=backbone, view_size=64, seed=0)
    q.set_views(((0, 8, 72, 80), False), ((4, 0, 96, 92), True))
    qa = source_to_view(obj, q.box_a, q.flip_a, 64)
    q.place(qa[0], qa[1], qa[2] - qa[0])
    assert q.box == (11, 7, 32, 28)
    qb = q.query_in_b()
    assert np.allclose(qb, source_to_view(obj, q.box_b, True, 64), atol=1) and qb[0] > 40   # flipped: right of view B
    assert _inside(q.best['layer2'], qb), (q.best, qb)
    q.place(40, 40, 20)                                                    # control: a background query
    assert not _inside(q.best['layer2'], qb), q.best


def test_render_region_match_draws_box_where_the_panel_says(rq):
    "The red query box is drawn where `view_a_px` predicts (the mapping the mouse relies on); no widget involved."
    from PIL import Image
    import io
    rq.move(16, 16, 32)
    png, panel = render_region_match(rq)
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    px = np.asarray(Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    x0, y0, x1, y1 = panel
    def red(x, y):
        u, v = int(round(x0 + x / 64 * (x1 - x0))), int(round(y0 + y / 64 * (y1 - y0)))
        p = px[v - 1:v + 2, u - 1:u + 2].reshape(-1, 3)
        return int((p[:, 0] - p[:, 1:].max(1)).max())
    assert red(16, 32) > 100 and red(48, 32) > 100 and red(32, 16) > 100 and red(32, 32) < 60


@pytest.fixture(scope='module')
def w():
    return RegionMatch(image='scene', scene_index=0, view_size=64, seed=0)


def _reference(w):
    "Maps of `w`'s current box computed from scratch (no cached features); `w` a RegionQuery or a RegionMatch."
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
    assert w2.x.value == 30                               # the slider itself moves ...
    assert w2.png == png and w2.box == (16, 16, 48, 48)   # ... but neither the query nor the display follows


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
    assert a[0].shape == (3, 48, 48) and isinstance(a[2], bool)


def test_random_view_draws_with_random_resized_boxes():
    "random_view's box is the one scfs.augment.random_resized_boxes draws from the same generator; the view is cut there."
    from PIL import Image
    img = Image.fromarray((np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8))
    flips = set()
    for seed in range(12):
        view, box, flip = random_view(img, 32, scale=(0.2, 0.6), gen=torch.Generator().manual_seed(seed))
        want = random_resized_boxes(1, 50, 70, (0.2, 0.6), generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(torch.tensor(box), want)
        assert 0.2 - 1e-4 <= (box[2] - box[0]) * (box[3] - box[1]) / (50 * 70) <= 0.6 + 1e-4
        torch.testing.assert_close(view, cut_view(img, box, flip, 32))
        flips.add(flip)
    assert flips == {False, True}
    torch.testing.assert_close(cut_view(img, box, True, 32), cut_view(img, box, False, 32).flip(-1))


def test_checkpoint_backbone(tmp_path):
    "Switching to a saved backbone (an exported state_dict) gives that backbone's maps."
    from scfs.backbone import build_backbone, backbone_state_dict_for_export
    torch.manual_seed(123)
    bb = build_backbone('small')
    with torch.no_grad():
        for p in bb.parameters(): p.add_(0.05 * torch.randn_like(p))
    ck = tmp_path / 'bb.pth'
    torch.save(backbone_state_dict_for_export(bb), ck)
    w4 = RegionMatch(image='scene', scene_index=3, backbone='random', view_size=64, seed=0)
    assert w4.backbone_choice.value == 'random init' and w4.backbone_name.startswith('random init (seed 0')
    before = {l: m.clone() for l, m in w4.maps.items()}
    w4.backbone_choice.value = 'checkpoint'; w4.checkpoint.value = str(ck)
    w4.backbone_button.click()
    assert w4.status.value == '' and w4.backbone_name.endswith('bb.pth')
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
    calls, searches = [], []
    update = wm.update
    wm.update = lambda: (calls.append(1), update())[1]
    wm.rq.search = lambda: (searches.append(wm.rq.box), RegionQuery.search(wm.rq))
    _send(wm, _event(wm, 'mousedown', 20, 44), _event(wm, 'mouseup', 20, 44))
    assert calls == [1] and searches == [(4, 28, 36, 60)]   # three sliders moved, one search, one redraw
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


def test_widget_reads_through_to_its_query(wm):
    assert wm.box is not None and wm.box == wm.rq.box and wm.maps is wm.rq.maps and wm.view_a is wm.rq.view_a
    with pytest.raises(AttributeError): wm.move        # the query's moves are not the widget's: use the sliders or rq
    with pytest.raises(AttributeError): wm.no_such_attribute


def test_freeze_stops_mouse(wm):
    png, box = wm.png, wm.box
    wm.freeze()
    _send(wm, _event(wm, 'mousedown', 40, 40), _event(wm, 'mouseup', 40, 40))
    assert wm.box == box and wm.png == png


# --- the default backbone: the shipped trained SCFS one, at the views it was trained with

def test_opens_on_tiny_scfs_at_its_training_views():
    from scfs.maps import open_backbone
    w5 = RegionMatch(image='scene', scene_index=1, seed=0)
    assert w5.backbone_choice.value == 'tiny-scfs' and w5.backbone_name.startswith('tiny-scfs (SCFS')
    assert (w5.view_size, w5.query_size) == (32, 16) and w5.maps['layer4'].shape == (2, 2)
    assert 'tiny-scfs (SCFS' in w5.readout.value
    want = open_backbone('tiny-scfs')[0]
    assert all(torch.equal(a, b) for a, b in zip(w5.backbone.state_dict().values(), want.state_dict().values()))
    ref = _reference(w5)
    for l in LAYERS: torch.testing.assert_close(w5.maps[l], ref[l])


def test_backbone_menu_switches_between_shipped_and_random():
    from scfs.maps import open_backbone
    w6 = RegionMatch(image='scene', scene_index=2, seed=0)
    assert list(w6.backbone_choice.options) == ['tiny-scfs', 'tiny-dino', 'random init', 'checkpoint']
    maps = {}
    for choice, name in (('tiny-dino', 'tiny-dino'), ('random init', 'random'), ('tiny-scfs', 'tiny-scfs')):
        w6.backbone_choice.value = choice; w6.backbone_button.click()
        assert w6.status.value == '' and w6.backbone_name == open_backbone(name)[1] and name.split('-')[-1] in w6.readout.value
        ref = _reference(w6)
        for l in LAYERS: torch.testing.assert_close(w6.maps[l], ref[l])
        maps[name] = {l: m.clone() for l, m in w6.maps.items()}
    assert not torch.allclose(maps['tiny-scfs']['layer2'], maps['random']['layer2'])
    assert not torch.allclose(maps['tiny-scfs']['layer2'], maps['tiny-dino']['layer2'])
