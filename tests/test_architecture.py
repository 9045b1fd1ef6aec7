"""The shape of the house, checked from the source: imports run one way (data_prep <- pipeline.core <- the stages
and tools), no import circle, no stage or tool imports another (one named exception), the module map in
pipeline/__init__.py names every module, every run-directory file name and Gemma control token is spelled only by its
owner, and every citation key used in code, tests or docs is defined in a References section of docs/.

Each rule is a function over the parsed source; each has a negative control that feeds it the violation it exists to
catch, so a rule that silently matches nothing fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("pipeline", "data_prep")
# The one import between stages and tools: the benchmark times the PPO stage's own loop, not a copy of it.
ALLOWED = {("pipeline.bench", "pipeline.ppo")}


def stages_and_tools() -> set[str]:
    """Every module of pipeline/*.py: what a user runs (a new file is covered without editing this test)."""
    return {f"pipeline.{p.stem}" for p in (REPO / "pipeline").glob("*.py") if p.stem != "__init__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, str]:
    """Every module of the two packages: name -> source."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            out[module_name(path)] = path.read_text(encoding="utf-8")
    return out


def imports(name: str, source: str, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = name.split(".")[: -node.level] if not name.endswith("__init__") else name.split(".")
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import pipeline.core.config` names a module; a symbol's module is above it
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph(srcs: dict[str, str]) -> dict[str, set[str]]:
    known = set(srcs)
    return {name: imports(name, src, known) for name, src in srcs.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None. Package __init__ modules that import nothing are leaves."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def layer(module: str) -> int:
    """data_prep 0, pipeline.core 1, the stages and tools 2."""
    if module.startswith("data_prep"):
        return 0
    if module == "pipeline" or module.startswith("pipeline.core"):
        return 1
    return 2


def arrows_up(g: dict[str, set[str]], top: set[str]) -> list[str]:
    """Imports from a lower layer to a higher one, and imports between the stages and tools ``top``."""
    bad = [f"{a} -> {b}" for a, deps in g.items() for b in deps if layer(b) > layer(a)]
    bad += [
        f"{a} -> {b} (stage or tool imports another)"
        for a, deps in g.items()
        for b in deps
        if a in top and b in top and (a, b) not in ALLOWED
    ]
    return sorted(bad)


def test_no_import_circle():
    g = graph(sources())
    assert len(g) > 30 and sum(map(len, g.values())) > 60, "the scan found too little to judge"
    assert find_cycle(g) is None, find_cycle(g)


def test_no_arrow_back_up_and_no_stage_imports_a_stage():
    g, top = graph(sources()), stages_and_tools()
    assert arrows_up(g, top) == []
    assert any(layer(b) == 0 for a, deps in g.items() if layer(a) == 1 for b in deps)  # the rule sees real edges
    # Every stage and tool is judged, DPO and publish included; the exception is a real edge, not a stale entry.
    assert {"pipeline.dpo", "pipeline.publish", "pipeline.ppo", "pipeline.bench"} <= top
    assert all(b in g[a] for a, b in ALLOWED)


def test_the_rules_catch_what_they_exist_for():
    srcs = sources()
    # A circle: config importing the CLI, which imports config.
    srcs["pipeline.core.config"] += "\nfrom pipeline.core.cli import run_cli\n"
    assert find_cycle(graph(srcs)) is not None
    srcs = sources()
    # data_prep reaching up into the pipeline; the core reaching into a stage; a stage importing a stage.
    srcs["data_prep.readers"] += "\nfrom pipeline.core.config import DatasetSpec\n"
    srcs["pipeline.core.checkpoint"] += "\ndef f():\n    from pipeline import sft\n"
    srcs["pipeline.ppo"] += "\nfrom pipeline.rm import init_score_head\n"
    assert arrows_up(graph(srcs), stages_and_tools()) == [
        "data_prep.readers -> pipeline.core.config",
        "pipeline.core.checkpoint -> pipeline.sft",
        "pipeline.ppo -> pipeline.rm (stage or tool imports another)",
    ]
    srcs = sources()
    # DPO importing SFT (a stage the hand-written list left out), a tool importing a stage other than the named
    # exception, and a module that exists only as a new file.
    srcs["pipeline.dpo"] += "\nfrom pipeline.sft import run\n"
    srcs["pipeline.bench"] += "\nfrom pipeline.rm import run\n"
    srcs["pipeline.distill"] = "from pipeline.report import main\n"
    assert arrows_up(graph(srcs), stages_and_tools() | {"pipeline.distill"}) == [
        "pipeline.bench -> pipeline.rm (stage or tool imports another)",
        "pipeline.distill -> pipeline.report (stage or tool imports another)",
        "pipeline.dpo -> pipeline.sft (stage or tool imports another)",
    ]


# ----------------------------------------------------------------------------------------------------------------
# The module map in pipeline/__init__.py
# ----------------------------------------------------------------------------------------------------------------


def modules_on_disk() -> dict[str, set[str]]:
    """The modules of pipeline/ and pipeline/core/, from the files: the map's two blocks."""
    return {
        block: {p.stem for p in (REPO / block).glob("*.py") if p.stem != "__init__"}
        for block in ("pipeline/", "pipeline/core/")
    }


def map_blocks(doc: str) -> dict[str, str]:
    """The map's block of each package: its header line (``    pipeline/core/    what ...``) and the indented lines
    under it, up to the next header."""
    blocks: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        header = re.match(r"^ {4}(\S+/)\s", line)
        if header:
            current = header.group(1)
            blocks[current] = line
        elif current and line.startswith(" " * 6):
            blocks[current] += "\n" + line
        else:
            current = None
    return blocks


def unmapped(doc: str, on_disk: dict[str, set[str]]) -> list[str]:
    """``block/name.py`` for every module its block of the map does not name (as a word of its own)."""
    blocks = map_blocks(doc)
    return sorted(
        f"{block}{name}.py"
        for block, names in on_disk.items()
        for name in names
        if not re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", blocks.get(block, ""))
    )


def test_the_module_map_names_every_stage_tool_and_core_module():
    doc = ast.get_docstring(ast.parse((REPO / "pipeline" / "__init__.py").read_text(encoding="utf-8")))
    on_disk = modules_on_disk()
    assert {"dpo", "publish"} <= on_disk["pipeline/"] and {"config", "rundir"} <= on_disk["pipeline/core/"]
    assert unmapped(doc, on_disk) == []


def test_the_map_rule_catches_a_module_left_out():
    doc = ast.get_docstring(ast.parse((REPO / "pipeline" / "__init__.py").read_text(encoding="utf-8")))
    on_disk = modules_on_disk()
    # A new core module no one added to the map, and a stage dropped from it (a name in another block or inside a
    # longer word does not count: ``rm`` is not named by ``rmdir``, ``data`` not by ``data_prep/``).
    on_disk["pipeline/core/"] |= {"prefetch"}
    assert unmapped(doc, on_disk) == ["pipeline/core/prefetch.py"]
    dropped = re.sub(r"\bdpo\b", "", doc)
    assert dropped != doc
    assert unmapped(dropped, on_disk) == ["pipeline/core/prefetch.py", "pipeline/dpo.py"]


# ----------------------------------------------------------------------------------------------------------------
# Names spelled by their owner only
# ----------------------------------------------------------------------------------------------------------------

OWNERS = {
    "pipeline.core.rundir": (
        "COMPLETE",
        "manifest.json",
        "reward_stats.json",
        "lineage.json",
        "metrics.jsonl",
        "trainer_state.json",
        "rejects.jsonl",
        "recipe.yaml",
        "config.json",
        "report.json",
        "report.md",
        "checkpoint-",
        "generation_config.json",
        "README.md",
        "GEMMA_TERMS_OF_USE",
    ),
    "data_prep.gemma_format": ("<end_of_turn>", "<start_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>"),
}
# Folder names too common to search for in any string: flagged where they are joined into a path (``x / "final"``).
FOLDERS = {"pipeline.core.rundir": ("final", "checkpoints", "adapter", "value", "wandb", "tokenizer", "data")}


def strings(source: str) -> list[tuple[int, str, bool]]:
    """(line, text, joined into a path) of every string constant that is not documentation (a docstring or a bare
    string statement, such as a dataclass field's); f-string pieces included."""
    tree = ast.parse(source)
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    path_parts = {
        id(side)
        for n in ast.walk(tree)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
        for side in (n.left, n.right)
    }
    return [
        (node.lineno, node.value, id(node) in path_parts)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def spells(text: str, name: str) -> bool:
    """``name`` in ``text`` as a name of its own (``config.json`` is not spelled by ``tokenizer_config.json``)."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}", text) is not None


def misspelled(srcs: dict[str, str]) -> list[str]:
    """``module:line: 'name'`` wherever a name is spelled outside its owner."""
    bad = []
    for module, source in srcs.items():
        for line, text, in_path in strings(source):
            for owner, names in OWNERS.items():
                bad += [f"{module}:{line}: {n!r}" for n in names if spells(text, n) and module != owner]
            for owner, names in FOLDERS.items():
                bad += [f"{module}:{line}: {n!r}" for n in names if in_path and text == n and module != owner]
    return sorted(bad)


def test_run_directory_names_and_control_tokens_are_spelled_by_their_owner_only():
    srcs = sources()
    assert misspelled(srcs) == []
    owned = {n for names in OWNERS.values() for n in names}
    found = {n for owner in OWNERS for _, text, _ in strings(srcs[owner]) for n in owned if spells(text, n)}
    assert found == owned  # every owner really spells its names (the scan reads what it should)


def test_the_spelling_rule_catches_a_second_spelling():
    srcs = sources()
    srcs["pipeline.report"] += '\nSTATS = run_dir / "rm" / "final" / "reward_stats.json"\n'
    srcs["pipeline.core.consistency"] += '\nEOT = f"{x}<end_of_turn>"\n'
    bad = misspelled(srcs)
    n = srcs["pipeline.report"].count("\n")
    assert f"pipeline.report:{n}: 'reward_stats.json'" in bad and f"pipeline.report:{n}: 'final'" in bad
    assert any(b.startswith("pipeline.core.consistency:") and "<end_of_turn>" in b for b in bad)
    assert len(bad) == 3


# ----------------------------------------------------------------------------------------------------------------
# Citation keys
# ----------------------------------------------------------------------------------------------------------------

# A key is a capital letter and a number (P5, Q5, T8, W1, E6) or an item of the two "N implementation details" lists.
KEY = re.compile(r"\b(?:[A-Z]\d{1,2}|N\+? details? \d{1,2})\b")


def used_keys(text: str) -> set[str]:
    return {k.replace("detail ", "details ") for k in KEY.findall(text)}


def defined_keys() -> set[str]:
    """The keys the References sections of docs/*.md define, one per table row: ``| P5 | ... |``."""
    keys = set()
    for path in (REPO / "docs").glob("*.md"):
        text = path.read_text(encoding="utf-8")
        if "\n## References" in text:
            section = text.split("\n## References", 1)[1].split("\n## ", 1)[0]
            keys |= {m.group(1) for m in re.finditer(r"^\| (\S+(?: details \d+)?) \|", section, re.M)}
    return keys


def keys_in_use() -> dict[str, set[str]]:
    out = {}
    for path in [
        *(REPO / "pipeline").rglob("*.py"),
        *(REPO / "data_prep").rglob("*.py"),
        *(REPO / "tests").rglob("*.py"),
    ]:
        if path.name != "test_architecture.py":
            out[str(path.relative_to(REPO))] = used_keys(path.read_text(encoding="utf-8"))
    for path in [*(REPO / "docs").glob("*.md"), REPO / "README.md"]:
        text = path.read_text(encoding="utf-8")
        if "\n## References" in text:  # the definitions themselves (and the sources they cite)
            head, _, rest = text.partition("\n## References")
            text = head + ("\n## " + rest.split("\n## ", 1)[1] if "\n## " in rest else "")
        out[str(path.relative_to(REPO))] = used_keys(text)
    return out


def undefined(in_use: dict[str, set[str]], defined: set[str]) -> list[str]:
    return sorted(f"{where}: {k}" for where, keys in in_use.items() for k in keys if k not in defined)


def test_citation_keys_are_defined_in_docs():
    in_use, defined = keys_in_use(), defined_keys()
    # the scan sees the keys code, tests and docs use: each family, and "N+ detail 11" as "N+ details 11"
    assert {"P5", "P12", "Q5", "T8", "W1", "E6", "N+ details 11"} <= set().union(*in_use.values())
    assert undefined(in_use, defined) == []


@pytest.mark.parametrize("text", ["see pitfall P99 here", "as in N+ detail 42", "# X3 ----", "(W9)"])
def test_the_citation_rule_catches_an_undefined_key(text):
    assert undefined({"x.py": used_keys(text)}, defined_keys()) != []


# --------------------------------------------------------------------------------------------------------------
# The core knows no stage's voice: it prints no stage's prefix ("[ppo] ...") and reads no stage's metric keys
# --------------------------------------------------------------------------------------------------------------

STAGE_VOICE = re.compile(r"\[(?:data|sft|rm|ppo|dpo|report)\]|['\"](?:score_first|score_last|kl_last_10|updates)['\"]")


def stage_voice(srcs: dict[str, str]) -> list[str]:
    """``module:line`` of every string in pipeline.core that speaks for a stage: its console prefix, or one of the
    PPO summary keys a stage computes (the stage owns both; the core takes them as arguments)."""
    out = []
    for name, source in srcs.items():
        if not name.startswith("pipeline.core"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and STAGE_VOICE.search(node.value):
                out.append(f"{name}:{node.lineno}")
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                if STAGE_VOICE.search(repr(node.slice.value)):
                    out.append(f"{name}:{node.lineno}")
    return out


def test_the_core_prints_no_stage_prefix_and_reads_no_stage_metrics():
    assert not stage_voice(sources())


def test_the_stage_voice_rule_catches_a_prefix_and_a_metric_key():
    bad = {
        "pipeline.core.x": 'import sys\nprint(f"[ppo] warning: {msg}", file=sys.stderr)\n',
        "pipeline.core.y": "def f(metrics):\n    return metrics['score_last']\n",
        "pipeline.ppo": 'print("[ppo] fine here")\n',
    }
    assert stage_voice(bad) == ["pipeline.core.x:2", "pipeline.core.y:2"]
