"Tests for the data modules: scfs.shapes (clutter scenes), scfs.data (scene folders, CLI), scfs.images (robust ImageDataset, photos), scfs.core."
import io, json, warnings
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from scfs import core, images
from scfs.core import ScfsError
from scfs.shapes import make_scene, SCENE_CLASSES
from scfs.images import ImageDataset
from scfs.data import _SPLITS, generate_scenes, ensure_scenes, load_boxes


@pytest.mark.parametrize('val,expected', [('', False), ('0', False), ('false', False), ('1', True), ('true', True)])
def test_quick_mode(monkeypatch, val, expected):
    for k in ('CI', 'IN_TEST', 'SCFS_QUICK'): monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('SCFS_QUICK', val)
    assert core.quick_mode() is expected


def test_data_keeps_the_names_the_package_imports_from_it():
    "scfs.data sits on top of core, shapes, images and digits, and still exports what other modules import from it."
    import scfs.data as D, scfs.shapes, scfs.digits
    assert (D.ScfsError, D.quick_mode, D.atomic_write) == (core.ScfsError, core.quick_mode, core.atomic_write)
    assert (D.ImageDataset, D.load_images, D.sample_photos) == (images.ImageDataset, images.load_images, images.sample_photos)
    assert (D.make_scene, D.CLUTTER, D.DEFAULT_CLUTTER) == (scfs.shapes.make_scene, scfs.shapes.CLUTTER, scfs.shapes.DEFAULT_CLUTTER)
    assert D.make_digit_scene is scfs.digits.make_digit_scene and callable(D.add_cli)


def test_make_scene_deterministic_and_boxed():
    assert len(SCENE_CLASSES) >= 10 and len(set(SCENE_CLASSES)) == len(SCENE_CLASSES)
    for i in range(30):
        a = make_scene(np.random.default_rng([7, 0, i]), 64)
        b = make_scene(np.random.default_rng([7, 0, i]), 64)
        assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1:] == b[1:]
        img, lab, (x0, y0, x1, y1) = a
        assert img.mode == 'RGB' and img.size == (64, 64) and 0 <= lab < len(SCENE_CLASSES)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert 0.3 * 64 <= max(x1 - x0, y1 - y0) <= 0.75 * 64 + 1     # default level 'low': side 50-75 % (tight box of a rotated shape)
    c = make_scene(np.random.default_rng([8, 0, 0]), 64)
    assert not np.array_equal(np.asarray(c[0]), np.asarray(make_scene(np.random.default_rng([7, 0, 0]), 64)[0]))
    img, lab, box = make_scene(np.random.default_rng(0), 32, label=3)
    assert img.size == (32, 32) and lab == 3


def test_colour_does_not_give_class_away():
    "Mean colour inside the object box is not predictive: per-class means lie close to the overall mean."
    means = {c: [] for c in range(len(SCENE_CLASSES))}
    for i in range(360):
        img, lab, (x0, y0, x1, y1) = make_scene(np.random.default_rng([3, 0, i]), 64, label=i % len(SCENE_CLASSES))
        means[lab].append(np.asarray(img, dtype=np.float32)[y0:y1, x0:x1].reshape(-1, 3).mean(0))
    per_class = np.array([np.mean(v, 0) for v in means.values()])
    spread = np.std(np.concatenate(list(means.values())), 0)        # within-class variation of a scene's mean colour
    assert (np.abs(per_class - per_class.mean(0)) < spread).all()


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob('*')) if p.is_file()}


def test_generate_scenes_layout_and_bytes(tmp_path):
    a = generate_scenes(tmp_path / 'a', n_train=26, n_test=13, size=48, seed=5, workers=2)
    b = generate_scenes(tmp_path / 'b', n_train=26, n_test=13, size=48, seed=5, workers=0)
    ta, tb = _tree(a), _tree(b)
    assert ta == tb                                   # same seed -> byte-identical, whatever the number of workers
    pngs = [k for k in ta if k.endswith('.png') and k != 'preview.png']
    assert len(pngs) == 52 and {k.split('/')[0] for k in pngs} == {'train', 'val', 'test'}   # n_val defaults to n_test
    assert all(k.split('/')[1] in SCENE_CLASSES and len(k.split('/')[2]) == len('00000.png') for k in pngs)
    boxes = load_boxes(a)
    assert set(boxes) == set(pngs)
    C = SCENE_CLASSES
    for k in (f'train/{C[0]}/00000.png', f'train/{C[13 % len(C)]}/00013.png', f'test/{C[1]}/00001.png', f'val/{C[1]}/00001.png'):
        split, cls, name = k.split('/')
        i = int(name[:5])
        img, lab, box = make_scene(np.random.default_rng([5, _SPLITS[split], i]), 48, label=i % len(SCENE_CLASSES))
        assert boxes[k] == box and SCENE_CLASSES[lab] == cls
        assert np.array_equal(np.asarray(Image.open(a / k)), np.asarray(img))
    assert ta[f'val/{C[1]}/00001.png'] != ta[f'test/{C[1]}/00001.png']    # val is not a copy of test
    meta = json.loads((a / 'meta.json').read_text())
    assert meta['n_train'] == 26 and meta['size'] == 48 and meta['seed'] == 5 and meta['complete'] is True
    assert Image.open(a / 'preview.png').size[0] > 48 * 12
    assert all(Image.open(a / k).size == (48, 48) for k in pngs[:5])
    c = generate_scenes(tmp_path / 'c', n_train=26, n_test=13, size=48, seed=6, workers=0)
    assert _tree(c)['train/circle/00000.png'] != ta['train/circle/00000.png']


def test_ensure_scenes_reuses_and_regenerates(tmp_path):
    out = ensure_scenes(tmp_path / 's', n_train=24, n_test=0, size=32)
    t0 = (out / 'meta.json').stat().st_mtime_ns
    ensure_scenes(tmp_path / 's', n_train=24, n_test=0, size=32)
    assert (out / 'meta.json').stat().st_mtime_ns == t0
    ensure_scenes(tmp_path / 's', n_train=12, n_test=0, size=32)        # mismatch -> regenerated, stale files gone
    assert len(list((out / 'train').rglob('*.png'))) == 12
    (out / 'meta.json').write_text('{broken')
    ensure_scenes(tmp_path / 's', n_train=12, n_test=0, size=32)
    assert json.loads((out / 'meta.json').read_text())['n_train'] == 12


def test_generate_refuses_foreign_folder_and_bad_args(tmp_path):
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'thesis.tex').write_text('precious')
    with pytest.raises(ScfsError, match='mine'): generate_scenes(tmp_path / 'mine', 12, 0)
    assert (tmp_path / 'mine' / 'thesis.tex').read_text() == 'precious'
    with pytest.raises(ScfsError): generate_scenes(tmp_path / 'x', 12, 0, size=4)
    with pytest.raises(ScfsError): generate_scenes(tmp_path / 'x', 0, 0)
    with pytest.raises(ScfsError, match='boxes.json'): load_boxes(tmp_path / 'nothing')


def make_messy_folder(root: Path):
    "Good images next to broken and odd ones (the folder from issue 2)."
    (root / 'cats').mkdir(parents=True); (root / 'dogs').mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    rgb.save(root / 'cats/good.jpg', quality=90); rgb.save(root / 'dogs/good.png')
    buf = io.BytesIO(); rgb.save(buf, 'JPEG'); b = bytearray(buf.getvalue()); b[200:400] = b'\x00' * 200
    (root / 'cats/corrupt.jpg').write_bytes(bytes(b[:len(b) // 2]))
    buf = io.BytesIO(); rgb.save(buf, 'PNG'); (root / 'dogs/truncated.png').write_bytes(buf.getvalue()[:300])
    (root / 'dogs/notes.jpg').write_text('this is not an image')
    (root / 'dogs/readme.txt').write_text('not an image extension: ignored')
    (root / '.hidden').mkdir(); rgb.save(root / '.hidden/skipme.png')
    rgba = Image.new('RGBA', (20, 20), (255, 0, 0, 255)); rgba.putpixel((0, 0), (0, 0, 255, 0)); rgba.save(root / 'cats/rgba.png')
    Image.new('LA', (8, 8), (100, 255)).save(root / 'cats/la.png')
    p = Image.new('P', (5, 5)); p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762); p.putpixel((1, 1), 1); p.save(root / 'cats/palette.png')
    Image.new('CMYK', (10, 10), (0, 255, 255, 0)).save(root / 'cats/cmyk.jpg')
    a16 = np.full((6, 7), 65535, dtype=np.uint16); a16[0, 0] = 1000; a16[0, 1] = 0
    Image.fromarray(a16).save(root / 'dogs/sixteen.png')
    Image.new('L', (9, 9), 128).save(root / 'dogs/grey.png')
    Image.new('RGB', (1, 1), (0, 255, 0)).save(root / 'dogs/tiny.png')
    return root


def test_image_dataset_messy_folder(tmp_path):
    root = make_messy_folder(tmp_path / 'mess')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ds = ImageDataset(root)
    msgs = [str(x.message) for x in w if 'ImageDataset' in str(x.message)]
    assert len(msgs) == 1 and 'skipped 3' in msgs[0]
    assert ds.skipped == 3 and ds.classes == ['cats', 'dogs'] and len(ds) == 9
    rel = {ds.relpath(i): i for i in range(len(ds))}
    assert set(rel) == {'cats/good.jpg', 'cats/rgba.png', 'cats/la.png', 'cats/palette.png', 'cats/cmyk.jpg',
                        'dogs/good.png', 'dogs/sixteen.png', 'dogs/grey.png', 'dogs/tiny.png'}
    items = {k: ds[i] for k, i in rel.items()}
    assert all(im.mode == 'RGB' for im, _ in items.values())
    assert items['cats/good.jpg'][1] == 0 and items['dogs/good.png'][1] == 1
    assert items['cats/rgba.png'][0].getpixel((0, 0)) == (255, 255, 255)
    assert items['cats/rgba.png'][0].getpixel((3, 3)) == (255, 0, 0)
    assert items['cats/la.png'][0].getpixel((0, 0)) == (100, 100, 100)
    assert items['cats/palette.png'][0].getpixel((1, 1)) == (10, 200, 30)
    r, g, b = items['cats/cmyk.jpg'][0].getpixel((5, 5)); assert r > 200 and g < 60 and b < 60
    s16 = items['dogs/sixteen.png'][0]
    assert s16.getpixel((2, 2)) == (255, 255, 255) and s16.getpixel((0, 0)) == (4, 4, 4) and s16.getpixel((1, 0)) == (0, 0, 0)
    assert items['dogs/grey.png'][0].getpixel((4, 4)) == (128, 128, 128)
    assert items['dogs/tiny.png'][0].size == (1, 1) and items['dogs/tiny.png'][0].getpixel((0, 0)) == (0, 255, 0)
    assert ds.targets.count(0) == 5 and ds.targets.count(1) == 4


def test_image_dataset_never_crashes_mid_epoch(tmp_path):
    root = make_messy_folder(tmp_path / 'mess')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = ImageDataset(root)
        lazy = ImageDataset(root, verify=False)            # no up-front decode: failures handled at __getitem__
        assert len(lazy) == 12 and lazy.skipped == 0
        got = [lazy[i] for i in range(len(lazy))]
    assert len(got) == 12 and all(im.mode == 'RGB' for im, _ in got) and lazy.skipped == 3
    (root / 'dogs/grey.png').write_bytes(b'broken after init')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        got = [ds[i] for i in range(len(ds))]
    assert len(got) == 9 and ds.skipped == 4 and len(w) == 1


def test_image_dataset_errors_and_unlabelled(tmp_path):
    with pytest.raises(ScfsError, match='nope'): ImageDataset(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ScfsError, match='empty'): ImageDataset(tmp_path / 'empty')
    (tmp_path / 'txt').mkdir(); (tmp_path / 'txt' / 'a.txt').write_text('x')
    with pytest.raises(ScfsError, match='txt'): ImageDataset(tmp_path / 'txt')
    (tmp_path / 'bad').mkdir(); (tmp_path / 'bad' / 'a.png').write_text('x')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ScfsError, match='bad'): ImageDataset(tmp_path / 'bad')
    (tmp_path / 'flat').mkdir(); Image.new('RGB', (4, 4)).save(tmp_path / 'flat' / 'x.png')
    ds = ImageDataset(tmp_path / 'flat', transform=lambda im: im.size)
    assert ds.classes == [] and ds[0] == ((4, 4), -1)


def test_scenes_load_with_boxes(tmp_path):
    out = generate_scenes(tmp_path / 's', 24, 12, size=32, workers=0)
    ds, boxes = ImageDataset(out / 'train'), load_boxes(out)
    assert ds.classes == sorted(SCENE_CLASSES) and len(ds) == 24 and ds.skipped == 0
    for i in range(len(ds)):
        img, lab = ds[i]
        assert ds.relpath(i).split('/')[0] == ds.classes[lab]
        x0, y0, x1, y1 = boxes['train/' + ds.relpath(i)]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32


def test_sample_photos():
    photos = images.sample_photos()
    assert {p.stem for p in photos} >= {'chelsea', 'coffee', 'astronaut', 'rocket'}
    for p in photos:
        im = images.load_photo(p.stem)
        assert im.mode == 'RGB' and max(im.size) <= 512 and min(im.size) >= 200
    with pytest.raises(ScfsError): images.load_photo('does-not-exist')


def test_cli_scenes(tmp_path, capsys):
    from scfs.cli import main
    assert main(['scenes', str(tmp_path / 'o'), '--train', '12', '--test', '0', '--size', '32', '--seed', '3']) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / 'o') in out and '12 train' in out
    assert len(load_boxes(tmp_path / 'o')) == 12
    (tmp_path / 'foreign').mkdir(); (tmp_path / 'foreign' / 'f.txt').write_text('x')
    assert main(['scenes', str(tmp_path / 'foreign'), '--train', '12']) == 2
    assert 'error' in capsys.readouterr().err

