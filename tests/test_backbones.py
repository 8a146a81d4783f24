"""The shipped backbones (`data/backbones/`, `scfs.maps`): every file at most 2 MB with a complete JSON beside it, a
torchvision-style state dict, and each reproduces the test kNN its JSON reports (within 0.5 points) on the clutter
scenes, which a fresh clone generates first, as `scfs pretrain` does. Then what opens on them by default (`scfs maps`),
and the box-swap null of the on-object AUROC (`scfs.scores.auroc_vs_box_swap`, 10a_scores)."""
import argparse, json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import scfs.maps
from scfs.backbone import LAYERS, SmallResNet
from scfs.config import config_from_dict
from scfs.core import ScfsError
from scfs.data import ensure_scenes
from scfs.evaluate import knn_classify, labelled_features
from scfs.augment import eval_transform
from scfs.images import ImageDataset
from scfs.maps import (BACKBONES, SHIPPED, META_FIELDS, MAX_BYTES, shipped_backbone, shipped_meta, random_backbone,
                       open_backbone, ship_backbone, add_cli)
from scfs.scores import auroc_vs_box_swap, object_auroc, derangement

torch.set_num_threads(2)
ROOT = BACKBONES.parent.parent
NAMES = sorted(SHIPPED)
METHOD = {'tiny-scfs': 'scfs', 'tiny-dino': 'dino'}


# --- the files

@pytest.mark.parametrize('name', NAMES)
def test_file_small_and_json_complete(name):
    p = BACKBONES / f'{name}.pth'
    assert p.is_file(), f'{p} is missing'
    assert p.stat().st_size <= MAX_BYTES == 2_000_000, f'{p}: {p.stat().st_size} bytes > 2 MB'
    m = json.loads(p.with_suffix('.json').read_text())
    missing = [k for k in META_FIELDS if m.get(k) is None]
    assert not missing, f'{name}.json lacks {missing}'
    assert m['name'] == name and m['preset'] == 'tiny' and m['method'] == METHOD[name]
    for k in ('knn', 'random_knn'): assert set(m[k]) == {'val', 'test'} and all(0 <= v <= 100 for v in m[k].values())
    assert set(m['knn_protocol']) >= {'k', 'T', 'eval_size', 'bank', 'test', 'random_init_seed'}
    cfg = config_from_dict(m['config'])                              # the full settings, valid today
    for k in ('preset', 'method', 'seed', 'epochs', 'backbone', 'global_size', 'local_size', 'eval_size'):
        assert getattr(cfg, k) == m[k], k
    assert len(m['source_hash']) == 16


def test_both_from_the_same_settings_but_the_method():
    s, d = (shipped_meta(n)['config'] for n in ('tiny-scfs', 'tiny-dino'))
    runtime = {'out', 'resume', 'force', 'device', 'workers', 'threads', 'progress', 'tensorboard'}   # not settings
    assert {k for k in s if s[k] != d[k]} - runtime == {'method'}


@pytest.mark.parametrize('name', NAMES)
def test_torchvision_style_state_dict(name):
    sd = torch.load(BACKBONES / f'{name}.pth', weights_only=True)
    assert all(torch.is_tensor(v) and v.dtype in (torch.float32, torch.int64) for v in sd.values())
    m = shipped_meta(name)
    assert m['backbone'] == 'small'
    SmallResNet(**m['backbone_kw']).load_state_dict(sd, strict=True)   # every key, fc.* included
    bb, _ = shipped_backbone(name)
    assert not bb.training and torch.equal(bb.net.conv1.weight, sd['conv1.weight'])


def test_unknown_name_and_random_init():
    with pytest.raises(ScfsError, match='tiny-scfs'): shipped_backbone('tiny-nothing')
    state = torch.random.get_rng_state()
    a, m = random_backbone(0)
    assert torch.equal(state, torch.random.get_rng_state())           # the caller's RNG is untouched
    assert m['knn'] == shipped_meta('tiny-scfs')['random_knn'] and random_backbone(1)[1]['knn'] is None
    assert torch.equal(a.net.conv1.weight, random_backbone(0)[0].net.conv1.weight)
    assert open_backbone('random')[1].startswith('random init (seed 0')


# --- the kNN each JSON reports, reproduced

@pytest.fixture(scope='module')
def scenes():
    "The scenes the runs were evaluated on, generated (with the runs' settings, as `scfs pretrain` does) if missing."
    cfg = shipped_meta('tiny-scfs')['config']
    return ensure_scenes(ROOT / cfg['data'], n_train=cfg['scenes_train'], n_test=cfg['scenes_test'],
                         size=cfg['scenes_size'], clutter=cfg['scenes_clutter'], kind='shapes')


@pytest.fixture(scope='module')
def knn_data(scenes):
    "The kNN bank (train) and queries (test) at the runs' eval size, decoded once: (train dataset, test dataset)."
    size = shipped_meta('tiny-scfs')['knn_protocol']['eval_size']
    def load(split):
        ds = ImageDataset(scenes / split, transform=eval_transform(size))
        x, y = zip(*(ds[i] for i in range(len(ds))))
        return torch.utils.data.TensorDataset(torch.stack(x), torch.tensor(y))
    return load('train'), load('test')


def _knn(backbone, knn_data, m) -> float:
    p = m['knn_protocol']
    assert m['eval_size'] == p['eval_size'] == shipped_meta('tiny-scfs')['knn_protocol']['eval_size']
    return knn_classify(*labelled_features(backbone, *knn_data), k=p['k'], T=p['T'])


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_reproduces_its_test_knn(name, knn_data):
    bb, m = shipped_backbone(name)
    acc = _knn(bb, knn_data, m)
    assert abs(acc - m['knn']['test']) <= 0.5, (name, acc, m['knn']['test'])
    assert len(knn_data[1]) == m['config']['scenes_test']


@pytest.mark.slow
def test_reproduces_the_random_init_knn(knn_data):
    m = shipped_meta('tiny-scfs')
    bb, _ = random_backbone(m['knn_protocol']['random_init_seed'])
    acc = _knn(bb, knn_data, m)
    assert abs(acc - m['random_knn']['test']) <= 0.5, (acc, m['random_knn']['test'])


@pytest.mark.parametrize('name', NAMES)
def test_shipping_the_run_again_gives_the_same_files(name, tmp_path):
    run = ROOT / 'runs' / f"main-{name.split('-')[1]}"
    if not (run / 'results.json').is_file(): pytest.skip(f'{run} is not here (only where the main job ran)')
    out = ship_backbone(run, name, tmp_path)
    a, b = torch.load(out, weights_only=True), torch.load(BACKBONES / f'{name}.pth', weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith('fc.'))     # fc.* is a fresh init
    assert json.loads(out.with_suffix('.json').read_text()) == shipped_meta(name)


# --- what opens on them by default

def test_maps_cli_draws_tiny_scfs_by_default(tmp_path, monkeypatch):
    seen = []
    draw = scfs.maps.plot_search_maps
    def spy(backbone, views, **kw):
        seen.append((backbone, views['global_size'], views['locals'].shape[-1], kw['title']))
        return draw(backbone, views, **kw)
    monkeypatch.setattr(scfs.maps, 'plot_search_maps', spy)
    ap = argparse.ArgumentParser(); add_cli(ap.add_subparsers())
    photo = str(ROOT / 'data' / 'photos' / 'chelsea.jpg')
    for extra in ([], ['--backbone', 'tiny-dino'], ['--backbone', 'random']):
        a = ap.parse_args(['maps', '--image', photo, '--out', str(tmp_path / 'm.png'), *extra])
        assert a.func(a) == 0 and Image.open(tmp_path / 'm.png').size[0] > 100
    for (bb, gs, ls, title), name in zip(seen, ('tiny-scfs', 'tiny-dino', 'random')):
        want = open_backbone(name)
        assert title.startswith(want[1]) and (gs, ls) == (32, 16)     # the caption names it; its training views
        assert all(torch.equal(x, y) for x, y in zip(bb.state_dict().values(), want[0].state_dict().values()))
    assert seen[0][3].startswith('tiny-scfs (SCFS')
    with pytest.raises(ScfsError, match='not both'):
        a = ap.parse_args(['maps', '--image', photo, '--backbone', 'random', '--checkpoint', photo]); a.func(a)


# --- the box-swap null (10a_scores)

def square_scenes(root: Path, spread: int, n: int = 24, seed: int = 0) -> Path:
    "A scenes folder (boxes.json as `scfs scenes` writes it): 64-px noise with a bright square, centre within `spread` px of the middle."
    rng, boxes = np.random.default_rng(seed), {}
    (root / 'val' / 'square').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.normal(60, 20, (64, 64, 3))
        side, (cx, cy) = int(rng.integers(16, 25)), 32 + rng.integers(-spread, spread + 1, 2)
        x0, y0 = int(cx - side // 2), int(cy - side // 2)
        a[y0:y0 + side, x0:x0 + side] = 230
        rel = f'val/square/{i:05d}.png'
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / rel)
        boxes[rel] = [x0, y0, x0 + side, y0 + side]
    (root / 'boxes.json').write_text(json.dumps(boxes))
    return root


def centre_maps(backbone, locals_, globals_, layers=LAYERS):
    "Knows nothing of the image: every map peaks at the centre of the view."
    def grid(n):
        c = (torch.arange(n) + 0.5) / n - 0.5
        return -(c[:, None] ** 2 + c[None, :] ** 2)
    return {l: grid(globals_.shape[-1] // s)[None].repeat(len(locals_), 1, 1) for l, s in zip(layers, (4, 8, 16))}


def bright_maps(backbone, locals_, globals_, layers=LAYERS):
    "Finds the object by its content: the brightness of global view 0, pooled to each layer's grid."
    g = globals_[0].mean(0)[None, None]
    return {l: F.avg_pool2d(g, s)[0, 0][None].repeat(len(locals_), 1, 1) for l, s in zip(layers, (4, 8, 16))}


KW = dict(n_images=24, n_local=4, global_size=64, local_size=32, global_scale=(0.8, 1.0), n_boot=200)


def test_derangement():
    for n, seed in ((2, 0), (7, 3), (50, 1)):
        p = derangement(n, seed)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n)) and p == derangement(n, seed)
    with pytest.raises(ValueError): derangement(1)


def test_box_swap_null_catches_a_centre_prior(tmp_path):
    "A map that always peaks at the view centre scores high on the real boxes of centred objects, and as high on swapped ones."
    r = auroc_vs_box_swap(None, square_scenes(tmp_path / 'centred', spread=4), maps_fn=centre_maps, **KW)
    shuffled = object_auroc(None, tmp_path / 'centred', maps_fn=centre_maps, shuffle_maps=True, **KW)['summary']
    for l in LAYERS:
        s = r['summary'][l]
        assert s['on'] > 0.8 and s['n_gap_on'] > 10                     # high against the real boxes ...
        assert abs(s['gap_on']) < 0.05 and s['ci_gap_on'][0] < 0 < s['ci_gap_on'][1]   # ... and the null equals it
        assert abs(shuffled[l]['on'] - 0.5) < 0.1                       # the shuffled floor would have credited it


def test_box_swap_null_keeps_content(tmp_path):
    "A map that finds scattered objects by their brightness scores 1 on the real boxes and far less on swapped ones."
    r = auroc_vs_box_swap(None, square_scenes(tmp_path / 'scattered', spread=18), maps_fn=bright_maps, **KW)
    for l in LAYERS:
        s = r['summary'][l]
        assert s['on'] > 0.95 and s['swap_on'] < 0.75 and s['gap_on'] > 0.25 and s['ci_gap_on'][0] > 0
    assert {(x['image'], x['crop'], x['kind']) for x in r['real']['rows']} >= \
           {(x['image'], x['crop'], x['kind']) for x in r['swap']['rows']}   # the same crops, their own kinds
