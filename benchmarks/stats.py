"""The readability budgets of issue 29, measured: `make stats` (or `python benchmarks/stats.py`).

Lines are all lines of a file, as `wc -l` counts them (the teaching path: non-blank lines); "strings" is the share
of characters in string literals (docstrings and the literal parts of f-strings included).
Prints one table and the budgets, met or not; exits 0 either way (a measurement, not a test).
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# in pipeline order: a stage may import only common, castle_kernels and the stages before it
STAGES = ["common", "poison", "train_ddpm", "finetune_sd", "sample", "classify", "dissect", "detect", "replicate",
          "study"]
# the README's teaching path: (what, file, first and last top-level definition read), in non-blank lines
TEACHING = [
    ("the pixel U-Net and its diffusion", "train_ddpm", "UNetConfig", "diffusion_from_config"),
    ("the SD v1 U-Net and VAE", "finetune_sd", "GroupNorm", "AutoencoderKL"),
    ("the samplers and guidance", "sample", "ddpm", "sd_guided_eps"),
    ("the DDPM training loop", "train_ddpm", "main", "main"),
    ("the SD fine-tuning loop", "finetune_sd", "main", "main"),
    ("Cognitive Distillation", "detect", "cd_loss", "cd_scores"),
    ("the dissection (G1-G4)", "dissect", "group_fractions", "dissect_folder"),
]
BUDGET_TOTAL, BUDGET_FILE, BUDGET_STRINGS, BUDGET_WIDTH, BUDGET_DOCSTRING, BUDGET_README = 7000, 1000, 0.20, 120, 20, 250


def measure(path):
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]  # for the prose share
    tree = ast.parse(text)
    # prose: the characters of string constants, docstrings included, and the literal parts of f-strings
    strings = sum(len(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str))
    doc = ast.get_docstring(tree) or ""
    imports = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        imports |= {n.split(".")[0] for n in names if n.split(".")[0] in STAGES}
    return dict(lines=len(text.splitlines()), chars=sum(len(l) for l in lines), strings=strings,
                wide=sum(len(l) > BUDGET_WIDTH for l in text.splitlines()), docstring=len(doc.splitlines()),
                imports=sorted(imports))


def span_lines(path, first, last):
    """Non-blank lines from the top-level definition `first` to the end of `last` (None: a name is missing)."""
    text = path.read_text()
    nodes = {getattr(n, "name", None): n for n in ast.parse(text).body}
    if first not in nodes or last not in nodes:
        return None
    start = min([nodes[first].lineno] + [d.lineno for d in nodes[first].decorator_list])
    return sum(1 for line in text.splitlines()[start - 1:nodes[last].end_lineno] if line.strip())


def main():
    rows = {name: measure(ROOT / f"{name}.py") for name in STAGES if (ROOT / f"{name}.py").exists()}
    print(f"| file | lines | strings | lines > {BUDGET_WIDTH} | docstring lines | imports |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name}.py | {r['lines']} | {r['strings'] / max(r['chars'], 1):.0%} | {r['wide']} | {r['docstring']} "
              f"| {', '.join(r['imports'])} |")
    total = sum(r["lines"] for r in rows.values())
    share = sum(r["strings"] for r in rows.values()) / sum(r["chars"] for r in rows.values())
    backward = [f"{a} imports {b}" for a, r in rows.items() for b in r["imports"]
                if b != a and STAGES.index(b) > STAGES.index(a)]
    readme = len((ROOT / "README.md").read_text().splitlines())
    checks = [
        (f"stage and study code <= {BUDGET_TOTAL} lines", total <= BUDGET_TOTAL, f"{total}"),
        (f"no file over {BUDGET_FILE} lines", all(r["lines"] <= BUDGET_FILE for r in rows.values()),
         ", ".join(f"{n}.py {r['lines']}" for n, r in rows.items() if r["lines"] > BUDGET_FILE) or "none"),
        (f"string literals <= {BUDGET_STRINGS:.0%} of characters", share <= BUDGET_STRINGS, f"{share:.1%}"),
        (f"lines <= {BUDGET_WIDTH} characters", all(r["wide"] == 0 for r in rows.values()),
         f"{sum(r['wide'] for r in rows.values())} over"),
        (f"module docstrings <= {BUDGET_DOCSTRING} lines", all(r["docstring"] <= BUDGET_DOCSTRING for r in rows.values()),
         ", ".join(f"{n}.py {r['docstring']}" for n, r in rows.items() if r["docstring"] > BUDGET_DOCSTRING) or "none"),
        ("imports point one way (no cycles)", not backward, "; ".join(backward) or "yes"),
        (f"README.md <= {BUDGET_README} lines", readme <= BUDGET_README, f"{readme}"),
    ]
    print()
    print("teaching path (non-blank lines):")
    for what, name, first, last in TEACHING:
        n = span_lines(ROOT / f"{name}.py", first, last)
        print(f"  {what:34s} {name}.py {first}..{last}: {'MISSING' if n is None else n}")
    print()
    for what, ok, value in checks:
        print(f"{'met    ' if ok else 'NOT MET'}  {what}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
