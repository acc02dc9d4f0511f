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
    path: str = Field(description="a safemerge model folder, an HF folder, or a .safetensors file of the encoder")
    task: str | None = Field(default=None, description="task name, when the folder carries no manifest")


class MergeConfig(Strict):
    """`safemerge merge CONFIG.yaml`: which models, which base, which method, where to write."""

    base_model: str = Field(description="'vision' / 'text' (offline defaults) or a local HF folder")
    models: list[ModelRef] = Field(min_length=1)
    method: str = "task_arithmetic"
    parameters: dict[str, Any] = Field(default_factory=dict)
    output: str
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

        opts = registry.validate(self.method, self.parameters, "merge")
        entry = registry.get(self.method, "merge")
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
