"""Sharing exports on the Hugging Face Hub: model cards, folders that load without ldm_app, and uploads.

- `write_model_card`: README.md with the YAML header diffusers' training scripts write (base model, tags, licence,
  prompts, widget with the sample grid), built with huggingface_hub's `ModelCard` as diffusers'
  `load_or_create_model_card` / `populate_model_card` do.
- `make_portable`: copies ldm_app's pipeline and UNet code into a pipeline folder and points model_index.json at
  it, the layout diffusers' custom-code loading reads, so `DiffusionPipeline.from_pretrained(folder,
  trust_remote_code=True)` works where ldm_app is not installed. ldm_app itself keeps loading its own classes
  (`native_index`).
- `push_to_hub`: `HfApi.create_repo` + `upload_folder`.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .atomic import atomic_write

PACKAGE_DIR = Path(__file__).parent
PIPELINE_MODULE = "ldm_pipeline"  # the folder's entry module: model_index.json's `_class_name` names it
UNET_MODULE = "unet"  # unet/unet.py in the folder; model_index.json's unet entry names it
CARD_TAGS = {"pipeline": ["text-to-image", "diffusers", "diffusers-training", "ldm-app"],
             "lora": ["text-to-image", "diffusers", "diffusers-training", "lora", "ldm-app"]}

# ----------------------------------------------------------------------------------------------------------
# Model cards


def _hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (the Hub rejects a card whose base_model is a local path), else None."""
    if not name or Path(name).expanduser().exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    return name


def _usage(kind: Literal["pipeline", "lora"], where: str, portable: bool) -> str:
    """The card's "How to use" section: ldm-app's CLI, and plain diffusers where the folder allows it."""
    if kind == "lora":
        return ("```bash\nldm-app generate --model BASE_MODEL --lora " + where + ' "a prompt"\n```\n\n'
                "```python\npipe.load_lora_weights(\"" + where + "\")  # on a pipeline of the base model\n```\n")
    text = "```bash\nldm-app generate --model " + where + ' "a prompt"\n```\n'
    if portable:  # make_portable copied the code in: no ldm_app needed
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
                "## How to use\n", _usage(kind, repo_id or str(folder), portable)]
    if sample:
        sections += ["## Samples\n", f"![samples]({sample})\n"]
    if prompts:
        sections += ["Prompts:\n", "".join(f"- {p}\n" for p in prompts)]
    if config_dict:
        config_yaml = yaml.safe_dump(config_dict, sort_keys=False)
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


def _relative_imports(module: Path) -> list[str]:
    """The sibling modules `module` imports (`from .x import y`)."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    return [node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]


def pipeline_sources() -> list[Path]:
    """ldm_app/pipeline.py and every ldm_app module it needs, transitively: the code a portable folder carries."""
    needed, todo = [], [PACKAGE_DIR / "pipeline.py"]
    while todo:
        module = todo.pop()
        if module not in needed:
            needed.append(module)
            todo += [PACKAGE_DIR / f"{name.replace('.', '/')}.py" for name in _relative_imports(module)]
    return needed


def make_portable(folder: str | os.PathLike) -> Path:
    """Make a saved `LdmPipeline` folder load in plain diffusers: `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`, with no ldm_app installed.

    Copies ldm_app's modules unchanged: pipeline.py and what it imports into the folder, unet.py into unet/
    (diffusers' custom-component layout), plus an entry module `ldm_pipeline.py` that imports each copy, since
    diffusers brings along only the modules an entry module imports directly. model_index.json then names them.
    The copies come from the installed ldm_app at export time, so they always match the code that wrote the
    weights. model_index.json is written last: an interrupted call leaves a folder that still loads in ldm_app.
    """
    folder = Path(folder)
    index = _read_index(folder)
    if index.get("_class_name") not in ("LdmPipeline", [PIPELINE_MODULE, "LdmPipeline"]):
        raise ValueError(f"{folder} is not a saved LdmPipeline folder (model_index.json names "
                         f"{index.get('_class_name')!r}); save one with LdmPipeline.save_pretrained first.")
    sources = pipeline_sources()
    for source in sources:
        with atomic_write(folder / source.name) as tmp:
            shutil.copyfile(source, tmp)
    entry = ['"""LdmPipeline from ldm-app, for `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.',
             "", "Written by ldm_app.hub.make_portable. The modules beside it are unchanged copies of ldm_app's;",
             "each is imported here because diffusers copies only the modules that this entry module imports",
             'directly."""', ""]
    entry += [f"from .{s.stem} import *  # noqa: F401,F403" for s in reversed(sources) if s.stem != "pipeline"]
    entry += ["from .pipeline import LdmPipeline  # noqa: F401", ""]
    with atomic_write(folder / f"{PIPELINE_MODULE}.py") as tmp:
        tmp.write_text("\n".join(entry))
    for name, value in index.items():
        if isinstance(value, list) and value[1:] == ["LdmUNet"]:
            with atomic_write(folder / name / f"{UNET_MODULE}.py") as tmp:
                shutil.copyfile(PACKAGE_DIR / "unet.py", tmp)
            index[name] = [UNET_MODULE, "LdmUNet"]
    index["_class_name"] = [PIPELINE_MODULE, "LdmPipeline"]
    with atomic_write(folder / "model_index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def native_index(index: dict[str, Any]) -> dict[str, Any]:
    """model_index.json as ldm_app reads it: a portable folder's entries for its code copies (which only plain
    diffusers needs, and only with trust_remote_code) replaced by ldm_app's own classes. Other folders pass."""
    if index.get("_class_name") != [PIPELINE_MODULE, "LdmPipeline"]:
        return index
    return {**{k: ["ldm_app.unet", "LdmUNet"] if v == [UNET_MODULE, "LdmUNet"] else v for k, v in index.items()},
            "_class_name": "LdmPipeline"}


# ----------------------------------------------------------------------------------------------------------
# Upload


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload with ldm-app", allow_patterns: Sequence[str] | None = None) -> str:
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
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=commit_message,
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
