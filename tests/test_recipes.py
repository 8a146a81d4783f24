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
    "One tiny run through every stage `run_crop_sweep` uses (test kNN and the on-object AUROC included), then a skip."
    torch.set_num_threads(1)
    monkeypatch.setitem(R.BENCHMARKS, 'tinybench', str(bench))
    path, logs = tmp_path / 'recipes.json', []
    kw = dict(path=path, out_root=tmp_path / 'runs', test=True, auroc=4, log=logs.append)
    ov = dict(method='scfs', epochs=1, max_iters=1, batch_size=16, monitor_n=16, eval_size=32)
    r = R.run_recipe('probe', ov, 0, 'tinybench', **kw)
    stored = load_results(path)
    assert len(stored) == 1 and stored[0]['name'] == 'probe' and stored[0]['bench'] == 'tinybench' and stored[0]['steps'] == 1
    assert all(isinstance(stored[0][k], float) for k in ('val_knn', 'random_val_knn', 'test_knn', 'random_test_knn'))
    assert stored[0]['gain'] == pytest.approx(stored[0]['val_knn'] - stored[0]['random_val_knn'])
    assert set(stored[0]['auroc']) == {'layer2', 'layer3', 'layer4'} and all(0 <= v['on'] <= 1 for v in stored[0]['auroc'].values())
    assert not (tmp_path / 'runs' / 'probe-tinybench-s0').exists() and logs and 'probe [tinybench] seed 0' in logs[0]
    assert R.run_recipe('probe', ov, 0, 'tinybench', **kw) == {} and len(load_results(path)) == 1   # stored: skipped
    assert stored[0] == json.loads(json.dumps(r))                       # what was returned is what was stored
