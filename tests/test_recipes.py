"Tests for scfs.recipes: the resumable recipe runner end to end (train, kNN on val and test, AUROC, stored record)."
import json
import pytest
import torch
from scfs import recipes as R
from scfs.data import generate_scenes
from scfs.experiments import load_results


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp('bench') / 's', n_train=64, n_test=24, size=32, workers=1)


def test_run_recipe_end_to_end_stores_one_record_and_resumes(tmp_path, bench, monkeypatch):
    """One tiny run through every stage `run_crop_sweep` uses (test kNN and the on-object AUROC included), then a
    skip. The run folder is kept until the stored numbers have been recomputed from its checkpoint: kNN of the teacher
    and of the random init on val and on test (the run's k, T and size), the AUROC and its box-swap null per layer
    (was: isinstance float, 0 <= AUROC <= 1)."""
    import shutil, types
    from pathlib import Path
    from scfs.evaluate import knn_checkpoint, load_backbone
    from scfs.scores import auroc_vs_box_swap
    torch.set_num_threads(1)
    monkeypatch.setitem(R.BENCHMARKS, 'tinybench', str(bench))
    removed = []                                       # run_recipe's rmtree, deferred until the numbers are checked
    monkeypatch.setattr(R, 'shutil', types.SimpleNamespace(rmtree=lambda p, ignore_errors=False: removed.append(Path(p))))
    path, logs = tmp_path / 'recipes.json', []
    kw = dict(path=path, out_root=tmp_path / 'runs', test=True, auroc=4, log=logs.append)
    ov = dict(method='scfs', epochs=1, max_iters=1, batch_size=16, monitor_n=16, eval_size=32)
    r = R.run_recipe('probe', ov, 0, 'tinybench', **kw)
    run = tmp_path / 'runs' / 'probe-tinybench-s0'
    assert removed == [run] and logs and 'probe [tinybench] seed 0' in logs[0]
    stored = load_results(path)
    assert len(stored) == 1 and stored[0]['name'] == 'probe' and stored[0]['bench'] == 'tinybench' and stored[0]['steps'] == 1
    rec, cfg = stored[0], json.loads((run / 'config.json').read_text())
    assert rec['config'] == cfg and (cfg['seed'], cfg['max_iters'], cfg['knn_k'], cfg['eval_size']) == (0, 1, 20, 32)
    knn = dict(k=cfg['knn_k'], T=cfg['knn_T'], size=cfg['eval_size'])
    rnd = dict(backbone=cfg['backbone'], backbone_kw=cfg['backbone_kw'], seed=0)
    for split in ('val', 'test'):
        folders = (bench / 'train', bench / split)
        assert rec[f'{split}_knn'] == knn_checkpoint(run / 'checkpoint_last.pth', *folders, **knn)['acc'], split
        assert rec[f'random_{split}_knn'] == knn_checkpoint(None, *folders, **knn, **rnd)['acc'], split
    assert rec['gain'] == pytest.approx(rec['val_knn'] - rec['random_val_knn'])
    a = auroc_vs_box_swap(load_backbone(run / 'checkpoint_last.pth')[0], bench, split='val', n_images=4,
                          global_size=cfg['global_size'], local_size=cfg['local_size'], n_boot=1000)
    assert set(rec['auroc']) == {'layer2', 'layer3', 'layer4'}
    for l, v in rec['auroc'].items():
        want = (a['summary'][l][k] for k in ('on', 'off', 'swap_on', 'swap_off', 'gap_on'))
        got = (v[k] for k in ('on', 'off', 'null_on', 'null_off', 'gap_on'))
        assert [x for x in got] == pytest.approx([x for x in want], nan_ok=True), l
        assert v['n_on'] == a['real']['summary'][l]['n_on']
    shutil.rmtree(run)
    assert R.run_recipe('probe', ov, 0, 'tinybench', **kw) == {} and len(load_results(path)) == 1   # stored: skipped
    assert stored[0] == json.loads(json.dumps(r))                       # what was returned is what was stored
