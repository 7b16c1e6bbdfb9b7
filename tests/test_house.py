"""The package's shape: no import loop, a front door that does not import torch, generation without the
training extra, and every cross-field config rule checked before any work."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_app.config import load_config

PACKAGE = Path(__file__).resolve().parents[1] / "ldm_app"

# Imports of ldm_app modules inside functions, each kept on purpose; any other belongs at the top of its module.
# (importer, imported): "*" ends a pattern. Every lazy import still counts in the import-loop check below.
LAZY_IMPORTS = {
    ("ldm_app", "ldm_app.*"): "the package's public names load on first use (PEP 562): `import ldm_app` stays light",
    ("ldm_app.cli.*", "ldm_app.*"): "a command imports the library when it runs: `ldm-app --help` needs no torch",
    ("ldm_app.loading", "ldm_app.pipeline"): "start-up: the CLI's option definitions import loading's names",
    ("ldm_app.loading", "ldm_app.pipeline_loaders"): "start-up: as above",
    ("ldm_app.loading", "ldm_app.single_file"): "start-up: as above",
    ("ldm_app.loading", "ldm_app.lora_tags"): "start-up: as above",
    ("ldm_app.pipeline_loaders", "ldm_app.single_file"): "portable exports: checkpoint conversion stays out of the "
                                                           "pipeline code that hub.make_portable bundles",
    ("ldm_app.finetune", "ldm_app.trainer"): "optional extra: training needs ldm-app[train] (require_extra first)",
    ("ldm_app.distill", "ldm_app.trainer"): "optional extra: as above",
    ("ldm_app.finetune", "ldm_app.checkpoints"): "optional extra: as above",
    ("ldm_app.serve.jobs.service", "ldm_app.checkpoints"): "optional extra: a server without ldm-app[train] "
                                                            "serves, and its fine-tune jobs fail with the reason",
    ("ldm_app.serve", "ldm_app.serve.*"): "optional extra: the web extra is checked before the server's modules load",
    ("ldm_app.serve.app", "ldm_app.serve.*"): "optional extra: the routers and gradio load with the app",
    ("ldm_app.serve.server", "ldm_app.serve.*"): "privacy: telemetry is switched off before gradio is imported",
    ("ldm_app.serve.server", "ldm_app.threads"): "torch's thread count is set before the model loads",
    ("ldm_app.serve.__main__", "ldm_app.cli"): "`python -m ldm_app.serve` runs the CLI's serve command",
}


def _matches(pattern: str, name: str) -> bool:
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node: ast.AST, package: str) -> set[str]:
    """The ldm_app modules an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        if node.module:
            return {f"{base}.{node.module}"}
        return {f"{base}.{alias.name}" for alias in node.names}  # from . import a, b: the submodules a and b
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm_app"):
        return {node.module}
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.startswith("ldm_app")}
    return set()


def module_imports(package_dir: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """module → the package's modules it imports when it is imported (top level), and module → those it imports
    inside functions (when they run). Imports under `if TYPE_CHECKING:` never run and are left out."""
    eager, lazy = {}, {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        eager[name], lazy[name] = set(), set()
        for node in tree.body:
            eager[name] |= _imported(node, package)
        skipped = {id(n) for top in tree.body if _type_checking_only(top) for n in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) not in skipped and node not in tree.body:
                lazy[name] |= _imported(node, package) - eager[name]
    return eager, lazy


def import_loop(graph: dict[str, set[str]]) -> list[str] | None:
    """A path m → … → m through `graph`, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (loop := visit(target, path + [target])):
                return loop
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (loop := visit(module, [module])):
            return loop
    return None


def test_the_package_has_no_import_loop_even_through_imports_inside_functions():
    eager, lazy = module_imports()
    assert "ldm_app.cli.generate" in eager and eager["ldm_app.cli.generate"]  # the walk found the modules
    graph = {module: eager[module] | lazy[module] for module in eager}
    loop = import_loop(graph)
    assert loop is None, f"import loop: {' → '.join(loop)}"


def test_every_import_inside_a_function_is_one_kept_on_purpose():
    _, lazy = module_imports()
    unlisted = [f"{module} → {target}" for module, targets in sorted(lazy.items()) for target in sorted(targets)
                if not any(_matches(a, module) and _matches(b, target) for a, b in LAZY_IMPORTS)]
    assert not unlisted, (f"imports inside functions: {', '.join(unlisted)}; import at the module's top, or add "
                          "the pair to LAZY_IMPORTS with the reason")
    assert all(reason for reason in LAZY_IMPORTS.values())


def test_the_loop_check_finds_a_loop_through_an_import_inside_a_function(tmp_path):
    package = tmp_path / "ldm_app"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import helper\n")
    (package / "b.py").write_text("def helper():\n    from .a import thing\n    return thing\n")
    eager, lazy = module_imports(package)
    assert import_loop(eager) is None  # what the module-level walk alone saw
    assert import_loop({m: eager[m] | lazy[m] for m in eager}) == ["ldm_app.a", "ldm_app.b", "ldm_app.a"]


def imported_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_command_line_front_door_imports_neither_torch_nor_diffusers():
    modules = imported_after("from ldm_app.cli import app\ntry:\n    app.main(['--help'])\nexcept SystemExit:\n    pass")
    assert "ldm_app.cli.generate" in modules and "click" in modules
    assert not {"torch", "diffusers", "transformers"} & modules


def test_generation_needs_no_training_dependency():
    modules = imported_after("import ldm_app.loading, ldm_app.pipeline, ldm_app.inversion, ldm_app.png_metadata\n"
                             "from ldm_app import LdmPipeline")
    assert "ldm_app.pipeline" in modules
    assert not {"datasets", "pyarrow", "pandas", "tensorboard"} & modules


def test_the_cli_lists_the_inversion_methods_the_library_has():
    from ldm_app.cli.invert import METHODS
    from ldm_app.inversion import METHODS as LIBRARY_METHODS

    assert list(METHODS) == list(LIBRARY_METHODS)


@pytest.mark.parametrize("overrides, fix", [
    (["lora.rank=4"], "set model.pretrained_unet"),
    (["lora.train_text_encoder=true"], "set lora.rank > 0"),
    (["data.streaming=true"], "train.cache=false"),
    (["data.center_crop=false"], "data.center_crop=true or train.cache=false"),
    (["objective.zero_terminal_snr=true"], "prediction_type=v_prediction"),
])
def test_settings_that_cannot_work_together_are_refused_when_the_config_loads(overrides, fix):
    with pytest.raises(ValueError, match=fix.replace(".", r"\.").replace(">", ".")):
        load_config(None, overrides)


def test_a_training_command_without_the_train_extra_says_which_extra_to_install(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from ldm_app import extras
    from ldm_app.cli import app

    monkeypatch.setitem(extras.EXTRAS, "train", ("datasets", "a_module_that_is_not_installed"))
    r = CliRunner().invoke(app, ["finetune-lora", str(tmp_path), "--prompt", "x"])
    assert r.exit_code == 2 and 'pip install "ldm-app[train]"' in r.stderr
    assert "a_module_that_is_not_installed" in r.stderr and "Traceback" not in r.output


def test_push_to_hub_needs_a_repo_and_wandb_needs_wandb():
    with pytest.raises(ValueError, match="set train.hub_model_id=owner/name"):
        load_config(None, ["train.push_to_hub=true"])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match="pip install wandb"):
            load_config(None, ["train.report_to=wandb"])
    assert load_config(None, ["train.report_to=none"]).train.report_to == "none"


@pytest.mark.parametrize("override", ["train.adam_beta1=1.0", "train.adam_beta2=nan", "train.max_grad_norm=-1",
                                      "train.weight_decay=-0.1", "objective.noise_offset=-1", "objective.snr_gamma=0",
                                      "lora.alpha=0"])
def test_optimizer_and_objective_settings_out_of_range_are_refused_by_name(override):
    with pytest.raises(ValueError, match=override.split("=")[0].replace(".", r"\.") + "=.* must be"):
        load_config(None, [override])
