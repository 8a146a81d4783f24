"""README.md is generated from nbs/index.ipynb (quarto is not available): its markdown cells, in order, with
image links rewritten from the notebook folder to the repository root, and the stored Markdown output of every code
cell that starts with `#| readme` (the result tables, rendered from nbs/results/*.json by
`scfs.recipes.readme_results`). Other code cells are not copied (they draw figures saved under nbs/images/).

    python .ci/readme.py          # write README.md
    python .ci/readme.py --check  # exit 1 if README.md is out of date
"""
import json, pathlib, re, sys

root = pathlib.Path(__file__).resolve().parent.parent
HEADER = '<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n'

def render() -> str:
    nb = json.loads((root / 'nbs' / 'index.ipynb').read_text())
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown': parts.append(src.strip())
        elif src.startswith('#| readme'):
            md = [o['data']['text/markdown'] for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {})]
            if not md: sys.exit(f'nbs/index.ipynb: a `#| readme` cell has no Markdown output (execute the notebook)')
            parts.append(''.join(md[-1]).strip())
    text = '\n\n'.join(p for p in parts if p)
    text = re.sub(r'\]\((?!https?://|#|/)([^)\s]+)\)', lambda m: f'](nbs/{m.group(1)})', text)
    text = re.sub(r'src="(?!https?://|/)([^"]+)"', lambda m: f'src="nbs/{m.group(1)}"', text)
    return HEADER + text + '\n'

if __name__ == '__main__':
    new = render()
    readme = root / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != new:
            print('README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`'); sys.exit(1)
    else:
        readme.write_text(new); print('wrote', readme)
