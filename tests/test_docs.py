"""docs/RECIPE.md is the recipe the code cites: every "docs/RECIPE.md section N" in the repository resolves to a
section heading `## N.` there, and no citation names another RECIPE.md."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITED_SECTIONS = re.compile(r"\bsections? (\d+(?:(?:, | and )\d+)*)")


def recipe_sections():
    with open(os.path.join(ROOT, "docs", "RECIPE.md"), encoding="utf-8") as f:
        return {int(m.group(1)) for m in re.finditer(r"^## (\d+)\. \S", f.read(), flags=re.M)}


def citing_lines():
    """(file:line, text) of every line of the repository's code, scripts and docs that names RECIPE.md, docs/RECIPE.md
    and this test excluded (walked from the folder, which may be a bare copy without git)."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("out", "data", "__pycache__")] \
            if folder == ROOT else [d for d in dirs if d != "__pycache__"]
        for file in files:
            name = os.path.relpath(os.path.join(folder, file), ROOT)
            if name in ("docs/RECIPE.md", "tests/test_docs.py") or \
                    not name.endswith((".py", ".sh", ".md", ".cu", ".cuh", ".cpp", ".h")):
                continue
            with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if "RECIPE.md" in line:
                        yield f"{name}:{number}", line


def test_every_recipe_citation_resolves():
    sections = recipe_sections()
    assert sections >= set(range(1, 10)), f"docs/RECIPE.md has sections {sorted(sections)}"
    cited, broken = 0, []
    for where, line in citing_lines():
        if re.search(r"(?<!docs/)RECIPE\.md", line):
            broken.append(f"{where}: cites a RECIPE.md other than docs/RECIPE.md")
        for group in CITED_SECTIONS.findall(line):
            for n in map(int, re.findall(r"\d+", group)):
                cited += 1
                if n not in sections:
                    broken.append(f"{where}: section {n} is not in docs/RECIPE.md")
    assert not broken, "\n".join(broken)
    assert cited >= 20   # the model, data, schedule and checkpoint code all cite it
