"""The package's shape: no import loop, a front door that does not import torch, generation without the
training extra, and every cross-field config rule checked before any work."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_app.config import load_config

PACKAGE = Path(__file__).resolve().parents[1] / "ldm_app"


def module_imports() -> dict[str, set[str]]:
    """ldm_app module → the ldm_app modules it imports when it is imported (module level, not in functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.parse(path.read_text()).body:  # top level only: imports inside functions run later
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                if node.module:
                    targets.add(f"{base}.{node.module}")
                else:  # from . import a, b: the submodules a and b
                    targets.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ldm_app"):
                targets.add(node.module)
        graph[name] = targets
    return graph


def test_the_package_has_no_import_loop():
    graph = module_imports()
    assert "ldm_app.cli.generate" in graph and graph["ldm_app.cli.generate"]  # the walk found the modules
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph.get(module, ()):
            if target not in graph:
                continue
            assert state.get(target) != "open", f"import loop: {' → '.join(path + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


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
