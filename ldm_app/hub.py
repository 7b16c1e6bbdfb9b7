"""Sharing exports on the Hugging Face Hub: model cards, folders that load without ldm_app, and uploads.

- `write_model_card`: README.md with the YAML header diffusers' training scripts write (base model, tags, licence,
  prompts, widget with the sample grid), built with huggingface_hub's `ModelCard` as diffusers'
  `load_or_create_model_card` / `populate_model_card` do.
- `make_portable`: writes ldm_app's pipeline and UNet code into a pipeline folder and points model_index.json
  at it, the layout diffusers' custom-code loading reads, so `DiffusionPipeline.from_pretrained(folder,
  trust_remote_code=True)` works where ldm_app is not installed. ldm_app itself keeps loading its own classes
  (`ldm_app.pipeline_loaders.native_index`).
- `push_to_hub`: `HfApi.create_repo` + `upload_folder`.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .atomic import atomic_write
from .loading import looks_local
from .pipeline_loaders import PIPELINE_MODULE, UNET_MODULE

PACKAGE_DIR = Path(__file__).parent
CARD_TAGS = {"pipeline": ["text-to-image", "diffusers", "diffusers-training", "ldm-app"],
             "lora": ["text-to-image", "diffusers", "diffusers-training", "lora", "ldm-app"]}

# ----------------------------------------------------------------------------------------------------------
# Model cards


def _hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (the Hub rejects a card whose base_model is a local path), else None."""
    return None if not name or looks_local(name) else name


def _usage(kind: Literal["pipeline", "lora"], where: str, portable: bool, base_model: str | None = None) -> str:
    """The card's "How to use" section: ldm-app's CLI, and plain diffusers where the folder allows it. A LoRA's
    snippet loads its real base model (`--model` left out for the default one)."""
    if kind == "lora":
        model = "" if base_model in (None, "default") else f"--model {base_model} "
        base = "ldm-app's default model" if base_model in (None, "default") else base_model
        return (f"```bash\nldm-app generate {model}--lora {where} \"a prompt\"\n```\n\n"
                f"```python\npipe.load_lora_weights(\"{where}\")  # on a pipeline of {base}\n```\n")
    text = "```bash\nldm-app generate --model " + where + ' "a prompt"\n```\n'
    if portable:  # make_portable wrote the code in: no ldm_app needed
        text += ("\nWithout ldm-app (needs torch, diffusers, transformers, peft):\n\n```python\n"
                 "from diffusers import DiffusionPipeline\n\n"
                 f"pipe = DiffusionPipeline.from_pretrained(\"{where}\", trust_remote_code=True)\n"
                 "image = pipe(\"a prompt\").images[0]\n```\n")
    return text


def write_model_card(
    folder: str | os.PathLike,
    kind: Literal["pipeline", "lora"],
    base_model: str | None,
    prompts: Sequence[str],
    sample_image_path: str | os.PathLike | None = None,
    config_dict: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
) -> Path:
    """Write `folder`/README.md: the Hub's model card for an exported pipeline or LoRA folder.

    The YAML header is what diffusers' training scripts write (library, base_model, tags, licence, inference,
    instance_prompt, widget), so the Hub shows the sample grid and filters by base model. `sample_image_path` is
    copied into the folder (the card links it); `config_dict` (the resolved training config) is shown as YAML.
    `license` is the weights' licence: a fine-tune's is its base model's (SD-1.5: creativeml-openrail-m).
    `repo_id` is used in the usage snippets (default: the folder path).
    """
    folder = Path(folder)
    if kind not in CARD_TAGS:
        raise ValueError(f"kind={kind!r}; use 'pipeline' or 'lora'.")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; export the pipeline or LoRA first, then write its model card.")
    sample = None
    if sample_image_path is not None:
        source = Path(sample_image_path)
        if not source.is_file():
            raise ValueError(f"Sample image {source} does not exist; pass the grid the run wrote, or None.")
        sample = f"samples{source.suffix.lower()}"
        if source.resolve() != (folder / sample).resolve():
            with atomic_write(folder / sample) as tmp:
                shutil.copyfile(source, tmp)
    prompts = list(prompts)
    widget = [{"text": p, **({"output": {"url": sample}} if sample else {})} for p in prompts] or None
    data = ModelCardData(license=license, library_name="diffusers", base_model=_hub_id(base_model), inference=True,
                         instance_prompt=prompts[0] if kind == "lora" and prompts else None, widget=widget)
    what = "LoRA adapter" if kind == "lora" else "text-to-image latent diffusion pipeline"
    portable = isinstance(_read_index(folder).get("_class_name"), list) if kind == "pipeline" else False
    origin = {None: "trained from scratch", "default": "fine-tuned from ldm-app's embedded default model"}.get(
        base_model, f"base model: {base_model}")
    sections = [f"# {(repo_id or folder.name).split('/')[-1]}\n", f"A {what} made with ldm-app ({origin}).\n",
                "## How to use\n", _usage(kind, repo_id or str(folder), portable, base_model)]
    if sample:
        sections += ["## Samples\n", f"![samples]({sample})\n"]
    if prompts:
        sections += ["Prompts:\n", "".join(f"- {p}\n" for p in prompts)]
    if config_dict:
        plain = json.loads(json.dumps(config_dict, default=str))  # tuples → lists, paths → strings: YAML-safe
        config_yaml = yaml.safe_dump(plain, sort_keys=False)
        sections += ["## Training configuration\n", f"```yaml\n{config_yaml}```\n"]
    card = populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections)), CARD_TAGS[kind])
    with atomic_write(folder / "README.md") as tmp:
        card.save(tmp)
    return folder / "README.md"


# ----------------------------------------------------------------------------------------------------------
# Portable pipeline folders


def _read_index(folder: Path) -> dict[str, Any]:
    index = folder / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def _module_order(entry: Path, order: list[Path], seen: set[Path]) -> list[Path]:
    """`entry` and the sibling modules it imports at module level, each after the modules it needs."""
    seen.add(entry)
    for node in ast.parse(entry.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            module = entry.parent / f"{node.module.replace('.', '/')}.py"
            if module not in seen:
                _module_order(module, order, seen)
    order.append(entry)
    return order


def _unbundled(source: str, package: str) -> str:
    """A module's source with its relative imports undone: module-level ones dropped (the names are defined
    earlier in the bundle; `as` names become assignments), ones inside functions (lazy imports of optional
    features) pointed at the installed package, and `from __future__` dropped (the bundle has it once)."""
    lines = source.splitlines()
    for node in sorted(ast.walk(ast.parse(source)), key=lambda n: -getattr(n, "lineno", 0)):
        if not isinstance(node, ast.ImportFrom) or not (node.level == 1 or node.module == "__future__"):
            continue
        if node.module is None:
            raise ValueError(f"Cannot bundle `from . import {node.names[0].name}`; import from the module by name.")
        indent = " " * node.col_offset
        if node.module == "__future__":
            replacement = []
        elif node.col_offset == 0:
            replacement = [f"{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
        else:
            absolute = ast.ImportFrom(module=f"{package}.{node.module}", names=node.names, level=0)
            replacement = [indent + ast.unparse(absolute)]
        lines[node.lineno - 1:node.end_lineno] = replacement
    return "\n".join(lines)


def bundle_source(entry: str | os.PathLike, package: str = "ldm_app") -> str:
    """`entry` and the modules of its package it imports, as one module that imports no sibling: the code of a
    portable folder. Each module's text is kept but for its relative imports (see `_unbundled`); generated at
    export time from the installed package, so it always matches the code that wrote the weights."""
    modules = _module_order(Path(entry), [], set())
    defined: dict[str, str] = {}
    for module in modules:  # one namespace now: a name defined in two modules would silently shadow one
        for node in ast.parse(module.read_text(encoding="utf-8")).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
            for name in names:
                if defined.setdefault(name, module.name) != module.name:
                    raise ValueError(f"Cannot bundle {entry}: {name} is defined in both {defined[name]} and "
                                     f"{module.name}; rename one.")
    origin = textwrap.fill(f"Generated by ldm_app.hub.make_portable from {', '.join(m.name for m in modules)} "
                           "(in this order), each unchanged but for its relative imports.", width=110)
    header = (f'"""{Path(entry).name} of {package} and the {package} modules it needs, as one module, for plain '
              "diffusers:\n`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` without "
              f'{package} installed.\n\n{origin}\n"""\n\nfrom __future__ import annotations\n\n')
    sections = [f"# {'-' * 106}\n# {package}/{m.name}\n\n{_unbundled(m.read_text(encoding='utf-8'), package)}"
                for m in modules]
    return header + "\n\n".join(sections) + "\n"


def make_portable(folder: str | os.PathLike) -> Path:
    """Make a saved `LdmPipeline` folder load in plain diffusers: `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`, locally or from the Hub, with no ldm_app installed.

    Writes diffusers' custom-code layout: `pipeline.py` (ldm_app's pipeline module with the ldm_app modules it
    imports, `bundle_source`: a Hub download fetches only this one file of pipeline code) and `unet/unet.py`
    (the UNet module, bundled the same way), and points model_index.json at them. ldm_app itself goes
    on loading its own classes (`pipeline_loaders.native_index`). model_index.json is written last: an
    interrupted call leaves a folder that still loads in ldm_app.
    """
    folder = Path(folder)
    index = _read_index(folder)
    if index.get("_class_name") not in ("LdmPipeline", [PIPELINE_MODULE, "LdmPipeline"]):
        raise ValueError(f"{folder} is not a saved LdmPipeline folder (model_index.json names "
                         f"{index.get('_class_name')!r}); save one with LdmPipeline.save_pretrained first.")
    with atomic_write(folder / f"{PIPELINE_MODULE}.py") as tmp:
        tmp.write_text(bundle_source(PACKAGE_DIR / "pipeline.py"), encoding="utf-8")
    for name, value in index.items():
        if isinstance(value, list) and value[1:] == ["LdmUNet"]:
            with atomic_write(folder / name / f"{UNET_MODULE}.py") as tmp:
                tmp.write_text(bundle_source(PACKAGE_DIR / "unet.py"), encoding="utf-8")
            index[name] = [UNET_MODULE, "LdmUNet"]
    index["_class_name"] = [PIPELINE_MODULE, "LdmPipeline"]
    with atomic_write(folder / "model_index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------------
# Upload


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload with ldm-app", allow_patterns: Sequence[str] | None = None,
                repo_type: Literal["model", "dataset"] = "model") -> str:
    """Upload an exported folder to the Hub repo `repo_id` (created if missing); returns the commit's URL.

    `token` defaults to huggingface_hub's (HF_TOKEN or `hf auth login`); HF_ENDPOINT picks another Hub.
    `allow_patterns` limits the upload to some files, e.g. a LoRA's, its card and samples out of a run folder that
    also holds checkpoints (README.md is always included).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; export the pipeline or LoRA first.")
    if not (folder / "README.md").is_file():
        raise ValueError(f"{folder} has no README.md; write its model card first (ldm_app.hub.write_model_card).")
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
                                   repo_type=repo_type,
                                   allow_patterns=[*allow_patterns, "README.md"] if allow_patterns else None,
                                   ignore_patterns=[".*", "*.tmp*", "__pycache__/*"])
    except OfflineModeIsEnabled as error:
        raise ValueError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and retry.") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no"
        raise ValueError(f"Pushing {folder} to {repo_id} failed ({status} response: {str(error).splitlines()[0]}); "
                         "check the repo id and that the token (HF_TOKEN or --token) may write to it.") from error
    except ValueError as error:  # huggingface_hub's own, e.g. the Hub rejected the card's metadata: one line
        raise ValueError(" ".join(str(error).split())) from error
    return commit.commit_url


def share_export(folder: str | os.PathLike, kind: Literal["pipeline", "lora"], base_model: str | None,
                 prompts: Sequence[str], sample_image_path: str | os.PathLike | None = None,
                 config_dict: dict[str, Any] | None = None, license: str = "apache-2.0", push_to: str | None = None,
                 token: str | None = None, private: bool = False,
                 allow_patterns: Sequence[str] | None = None) -> str | None:
    """What every export ends with, in the order that matters: a pipeline folder made portable (its card then
    shows the plain-diffusers snippet), the model card, and the upload when `push_to` names a repo (its commit
    URL is returned; `allow_patterns` as in `push_to_hub`)."""
    if kind == "pipeline":
        make_portable(folder)
    write_model_card(folder, kind, base_model, prompts, sample_image_path, config_dict, license, repo_id=push_to)
    if push_to is None:
        return None
    if sample_image_path is not None and allow_patterns:
        allow_patterns = [*allow_patterns, f"samples{Path(sample_image_path).suffix.lower()}"]  # the card shows it
    return push_to_hub(folder, push_to, token=token, private=private, allow_patterns=allow_patterns)
