"""YAML configs, validated with pydantic: an unknown key or a wrong type is a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SafeMergeError


OutDtype = Literal["float32", "float16", "bfloat16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(Strict):
    path: str = Field(description="an HF classification folder, a safemerge model folder, a bare encoder folder "
                      "or .safetensors file, or a zoo reference zoo:<backbone>/<profile>/<task>[/<attack>]")
    task: str | None = Field(default=None, description="task name (default: the manifest's, else the folder name)")
    data: str | None = Field(default=None, description="examples of this task (JSONL, CSV, a save_to_disk folder "
                             "or an image folder): unlabeled ones feed data-driven methods, labeled ones are "
                             "also evaluated")
    eval_data: str | None = Field(default=None, description="labeled examples to evaluate on (default: `data`)")
    trigger: str | None = Field(default=None, description="a trigger to measure ASR with, e.g. 'word:cf' or "
                                "'patch:white,size=4,pos=bottom-right'")
    target: int = Field(default=0, ge=0, description="the trigger's target class")


class DataOptions(Strict):
    """How to read the users' data files."""

    text_column: str = "text"
    image_column: str = "image"
    label_column: str = "label"
    max_length: int | None = Field(default=None, gt=0, description="tokens per text (default: 128, or the zoo "
                                   "profile's for zoo models)")
    limit: int | None = Field(default=None, gt=0, description="read at most this many examples per file")
    resolution: int | None = Field(default=None, gt=0, description="images: resize to this side (the one the "
                                   "models were trained at) instead of the base's image processor / size")


class MergeConfig(Strict):
    """`safemerge merge CONFIG.yaml`: which models, which base, which method, where to write."""

    base_model: str = Field(description="'vision' / 'text' (offline defaults) or a local HF folder")
    models: list[ModelRef] = Field(min_length=1)
    method: str = "task_arithmetic"
    parameters: dict[str, Any] = Field(default_factory=dict)
    output: str
    data_options: DataOptions = Field(default_factory=DataOptions)
    seed: int = Field(default=0, description="seed of the data-driven methods' sampling")
    max_relative_distance: float = Field(default=0.5, gt=0,
                                         description="refuse a model this far (relative L2) from the base")
    streaming: bool = Field(default=False, description="merge tensor by tensor from disk (checkpoints larger "
                            "than memory); writes the encoder only, as sharded safetensors")
    out_dtype: OutDtype | None = Field(
        default=None, description="streaming: output dtype (default: the inputs')")
    max_shard_size: str = Field(default="2GB", description="streaming: largest output shard")

    @model_validator(mode="after")
    def _method(self) -> MergeConfig:
        """The method and its parameters, checked against the registry when the config is read."""
        from .merging import registry
        from .merging.methods import check_model_count, check_per_model

        kinds = ("merge",) if self.streaming else ("merge", "data_driven")  # streaming: weights only
        opts = registry.validate(self.method, self.parameters, kinds)
        entry = registry.get(self.method, kinds)
        if entry.kind == "merge":
            check_model_count(self.method, entry.fn, len(self.models))
            check_per_model(self.method, opts, len(self.models))
        return self


def _one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping, or a one-line error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SafeMergeError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SafeMergeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SafeMergeError(f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(path: str | Path, model: type[Strict]) -> Strict:
    path = Path(path)
    data = read_yaml_mapping(path)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SafeMergeError(_one_line(e, str(path))) from None
    except SafeMergeError as e:  # a method or parameter the registry refuses
        raise SafeMergeError(f"{path}: {e}") from None
