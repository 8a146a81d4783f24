"Relative links in README.md and in every notebook's markdown resolve: to a file or folder of the repository and, with `#anchor`, to a heading of that notebook or markdown file."
import json, re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)')   # [text](target "title"), ![img](target)
HTML = re.compile(r'\b(?:src|href)\s*=\s*["\']([^"\']+)["\']')
HTML_ID = re.compile(r'<a\s+(?:id|name)\s*=\s*["\']([^"\']+)["\']')
EXTERNAL = re.compile(r'^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)')                                       # http:, https:, mailto:, data:, //host


def strip_code(md: str) -> str:
    "Markdown without fenced code blocks and inline code spans (links there are examples, not links)."
    md = re.sub(r'^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$', '', md, flags=re.S | re.M)
    return re.sub(r'(`+)(?!`).*?(?<!`)\1(?!`)', '', md, flags=re.S)


def targets(md: str) -> list:
    md = strip_code(md)
    return [t for t in LINK.findall(md) + HTML.findall(md) if t]


def anchors(md: str) -> set:
    "Every anchor a heading of `md` gets: GitHub's slug, Jupyter's (spaces -> '-') and its lower-case form; explicit <a id=...>."
    out = set(HTML_ID.findall(md))
    for line in strip_code(md).splitlines():
        m = re.match(r'^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$', line)
        if not m: continue
        text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', m.group(1))         # [text](link) -> text
        text = re.sub(r'<[^>]+>', '', text).replace('`', '').replace('*', '').strip()
        jupyter = text.replace(' ', '-')
        github = re.sub(r'[^\w\- ]', '', text.lower()).replace(' ', '-')
        out |= {jupyter, jupyter.lower(), github}
    return out


def notebook_markdown(path: Path) -> str:
    nb = json.loads(path.read_text())
    return '\n\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')


def markdown_of(path: Path) -> str:
    return notebook_markdown(path) if path.suffix == '.ipynb' else path.read_text()


def broken_links(path: Path, root: Path = ROOT) -> list:
    "The relative links of `path` (README-style .md or a notebook) that resolve to nothing, as 'target (why)'."
    md, bad = markdown_of(path), []
    for t in targets(md):
        if EXTERNAL.match(t): continue
        file, _, anchor = t.partition('#')
        dest = (path.parent / unquote(file)).resolve() if file else path
        if file and not dest.exists():
            bad.append(f'{t} (no such file)')
        elif file and root.resolve() not in dest.parents and dest != root.resolve():
            bad.append(f'{t} (outside the repository)')
        elif anchor and dest.is_file() and dest.suffix in ('.ipynb', '.md') and unquote(anchor) not in anchors(markdown_of(dest)):
            bad.append(f'{t} (no heading #{anchor} in {dest.name})')
    return bad


DOCS = [ROOT / 'README.md'] + sorted(p for p in (ROOT / 'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts
                                     and not any(part.startswith(('_', '.')) for part in p.relative_to(ROOT / 'nbs').parts))


@pytest.mark.parametrize('path', DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_resolve(path):
    bad = broken_links(path)
    assert not bad, f'{path.relative_to(ROOT)}: {len(bad)} link(s) resolve to nothing: ' + '; '.join(bad)


def test_the_check_catches_broken_links(tmp_path):
    (tmp_path / 'images').mkdir(); (tmp_path / 'images' / 'a.png').write_bytes(b'')
    cells = [dict(cell_type='markdown', source=['# The model\n', '## How tiny departs from the official recipe\n']),
             dict(cell_type='code', source=['[not a link](nowhere.ipynb)'])]
    (tmp_path / '06_model.ipynb').write_text(json.dumps(dict(cells=cells)))
    (tmp_path / 'README.md').write_text('\n'.join([
        '# Title', '## Install it', '[ok](06_model.ipynb) ![ok](images/a.png) [ok](images/) [ok](#install-it) [web](https://x.org/y)',
        '[ok](06_model.ipynb#How-tiny-departs-from-the-official-recipe) [ok](06_model.ipynb#how-tiny-departs-from-the-official-recipe)',
        '<img src="images/a.png"> `[code](gone.md)`', '```', '[fenced](gone2.md)', '```',
        '[bad](07_train.ipynb) ![bad](images/b.png) [bad](#nowhere) [bad](06_model.ipynb#The-loss) <img src="images/c.png">']))
    assert broken_links(tmp_path / 'README.md', tmp_path) == [
        '07_train.ipynb (no such file)', 'images/b.png (no such file)', '#nowhere (no heading #nowhere in README.md)',
        '06_model.ipynb#The-loss (no heading #The-loss in 06_model.ipynb)', 'images/c.png (no such file)']
    assert broken_links(tmp_path / '06_model.ipynb', tmp_path) == []      # code cells are not markdown
