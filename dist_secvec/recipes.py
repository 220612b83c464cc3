"""`dist-secvec recipes`: the recipes shipped inside the package (dist_secvec/configs/, `configs/`
in the repository), listed with the first line of their header, and copied out for editing.

    dist-secvec recipes                      list them
    dist-secvec recipes copy NAME [DEST]     copy NAME.yaml and the DeepSpeed JSONs it names into DEST (default .)

A copy keeps the JSONs at the relative paths the recipe names (configs/ds_zero3.json), so it runs
from DEST as it does from the repository; elsewhere deepspeed.config is found next to the recipe
(config.resolve_recipe_file). Existing files are never overwritten.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from dist_secvec.config import PACKAGE_CONFIGS
from dist_secvec.errors import UserError

# stage recipes at the top, sweeps for `dist-secvec experiment` under experiments/; configs/demo/
# holds the demo's internal stage settings, not recipes
RECIPE_GLOBS = ("*.yaml", "experiments/*.yaml")
JSON_NAME = re.compile(r"(?<![\w./-])((?:configs/)?[\w.-]+\.json)\b")


def recipes() -> dict[str, Path]:
    """name (path under configs/ without .yaml) -> file."""
    out = {}
    for pattern in RECIPE_GLOBS:
        for p in sorted(PACKAGE_CONFIGS.glob(pattern)):
            out[str(p.relative_to(PACKAGE_CONFIGS).with_suffix(""))] = p
    return out


def first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def list_text() -> str:
    items = recipes()
    width = max(len(n) for n in items)
    lines = [f"{name:<{width}}  {first_comment(p)}" for name, p in items.items()]
    jsons = ", ".join(p.name for p in sorted(PACKAGE_CONFIGS.glob("*.json")))
    lines += ["", f"DeepSpeed configs: {jsons}", "copy one: dist-secvec recipes copy NAME [DEST]"]
    return "\n".join(lines)


def named_jsons(text: str) -> list[str]:
    """The shipped DeepSpeed JSONs a recipe names (deepspeed.config or its header's launch lines),
    as written there."""
    out = []
    for name in JSON_NAME.findall(text):
        if (PACKAGE_CONFIGS / Path(name).name).is_file() and name not in out:
            out.append(name)
    return out


def find(name: str) -> Path:
    items = recipes()
    key = name[:-5] if name.endswith(".yaml") else name
    key = key[len("configs/"):] if key.startswith("configs/") else key
    if key in items:
        return items[key]
    raise UserError(f"no recipe '{name}'; one of: {', '.join(items)} (list them: dist-secvec recipes)")


def copy_recipe(name: str, dest: Optional[str] = None) -> list[Path]:
    """Copy the recipe and its JSONs into dest; refuse (nothing written) if any target exists
    (except a JSON identical to the shipped one). Returns the files written."""
    src = find(name)
    root = Path(dest or ".").expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"destination '{root}' is a file, not a directory")
    plan = [(src, root / src.name)]
    plan += [(PACKAGE_CONFIGS / Path(j).name, root / j) for j in named_jsons(src.read_text(encoding="utf-8"))]
    # a JSON already there with the shipped content (another recipe's copy) is left as it is
    plan = [(s, t) for i, (s, t) in enumerate(plan) if not (i and t.is_file() and t.read_bytes() == s.read_bytes())]
    existing = [str(t) for _, t in plan if t.exists()]
    if existing:
        raise UserError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                        "nothing copied (move or delete them, or copy into another DEST)")
    for s, t in plan:
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, t)
    return [t for _, t in plan]


def main(action: Optional[str], args: list[str]) -> int:
    if action in (None, "list"):
        if args:
            raise UserError(f"unexpected arguments {' '.join(args)} (copy one: dist-secvec recipes copy NAME [DEST])")
        print(list_text())
        return 0
    if action != "copy":
        raise UserError(f"unknown action '{action}'; use `dist-secvec recipes` or "
                        "`dist-secvec recipes copy NAME [DEST]`")
    if not 1 <= len(args) <= 2:
        raise UserError("copy: expected NAME [DEST] (list the names: dist-secvec recipes)")
    written = copy_recipe(args[0], args[1] if len(args) > 1 else None)
    for t in written:
        print(t)
    src = find(args[0])
    recipe = Path(args[1] if len(args) > 1 else ".") / src.name
    command = "experiment" if src.parent.name == "experiments" else command_for(recipe)
    print(f"run it: dist-secvec {command} --config {recipe}", flush=True)
    return 0


def command_for(recipe: Path) -> str:
    return "train-sv" if "train_sv" in recipe.name else "finetune"
