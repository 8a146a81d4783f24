"""Enforce how notebooks are committed: executed top to bottom, small, and README in sync.

Rules (CI fails on any violation):
  * every non-empty code cell has an execution count, and the counts are 1, 2, 3, ... in cell order
    (the notebook was run top to bottom in a fresh kernel, e.g. `jupyter nbconvert --execute --inplace`);
  * no stored error outputs;
  * each notebook file is at most MAX_NB_BYTES (figures are stored downsampled);
  * every numbered notebook declares `#| default_exp` (one module per notebook);
  * every exported function and class has a `show_doc` cell in its notebook (`.ci/show_doc.py --check`);
  * README.md equals what `.ci/readme.py` generates from nbs/index.ipynb.
"""
import json, pathlib, subprocess, sys

MAX_NB_BYTES = 1_500_000
root = pathlib.Path(__file__).resolve().parent.parent
problems = []
nbs = sorted((root / 'nbs').glob('*.ipynb'))
for path in nbs:
    nb = json.loads(path.read_text())
    name = path.relative_to(root)
    size = path.stat().st_size
    if size > MAX_NB_BYTES: problems.append(f'{name}: {size/1e6:.2f} MB > {MAX_NB_BYTES/1e6:.1f} MB (downsample figures)')
    expected, exp = 1, False
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        if '#| default_exp' in src: exp = True
        if not src.strip(): continue
        if c.get('execution_count') != expected:
            problems.append(f'{name}: code cell {i} has execution_count {c.get("execution_count")}, expected {expected} '
                            '(commit notebooks executed top to bottom)')
            break
        expected += 1
        for o in c.get('outputs', []):
            if o.get('output_type') == 'error':
                problems.append(f'{name}: code cell {i} stores an error output ({o.get("ename")})')
    if path.stem[:2].isdigit() and not exp:
        problems.append(f'{name}: numbered notebooks export a module (`#| default_exp`)')
r = subprocess.run([sys.executable, str(root / '.ci' / 'show_doc.py'), '--check', *map(str, nbs)], capture_output=True, text=True)
if r.returncode: problems.append('an exported symbol has no show_doc cell (run `python .ci/show_doc.py nbs/*.ipynb`, then '
                                 're-execute): ' + '; '.join(l.strip() for l in (r.stdout + r.stderr).splitlines()
                                                                 if l.strip() and not l.rstrip().endswith('for nothing'))[:600])
r = subprocess.run([sys.executable, str(root / '.ci' / 'readme.py'), '--check'], capture_output=True, text=True)
if r.returncode: problems.append(r.stdout.strip() or r.stderr.strip())
for p in problems: print('NOTEBOOK CHECK:', p)
print(f'checked {len(nbs)} notebooks: {"OK" if not problems else f"{len(problems)} problem(s)"}')
sys.exit(1 if problems else 0)
