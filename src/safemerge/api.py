"""The Python API behind the CLI: resolve user paths and `zoo:` references, then call the core.

    from safemerge import MergeConfig, merge_models, evaluate_folder
    merge_models(MergeConfig(base_model="path/to/base", models=[{"path": "a", "data": "a.jsonl"},
                                                                  {"path": "b", "data": "b.jsonl"}],
                             method="dam", output="out/merged"))
    evaluate_folder("out/merged/a", data="a_test.jsonl", trigger="word:cf")
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backbones import Backbone, fingerprint, load_backbone, resolve_backbone_path
from .config import DataOptions, MergeConfig, ModelRef
from .data import Split, UserData, load_data, parse_trigger
from .errors import SafeMergeError
from .evaluate import attack_rates
from .folders import MANIFEST, TaskFolder, base_options, check_against_base, load_task_folder, save_task_folder
from .model import InputEncoder, TaskModel

ZOO_BACKBONES = {"minilm-l6": "text", "dinov2-vits14": "vision"}


# ------------------------------------------------------------------------------------------ resolving inputs


def resolve_path(path: str) -> Path:
    """A path, or a zoo reference `zoo:<backbone>/<profile>/<task>[/<attack>]` (e.g. zoo:vision/quick/mnist)."""
    if not str(path).startswith("zoo:"):
        return Path(path).expanduser()
    from .bench.zoo import Zoo

    parts = str(path)[4:].strip("/").split("/")
    if len(parts) not in (3, 4):
        raise SafeMergeError(f"bad zoo reference '{path}' (expected zoo:<backbone>/<profile>/<task>[/<attack>])")
    zoo = Zoo(parts[0], parts[1])
    out = zoo.path(parts[2], parts[3] if len(parts) == 4 and parts[3] != "clean" else None)
    if not (out / MANIFEST).exists():
        raise SafeMergeError(f"{path}: not built yet (run: safemerge zoo build --backbone {parts[0]} --profile "
                             f"{parts[1]} --task {parts[2]}" + (f" --attack {parts[3]})" if len(parts) == 4 else ")"))
    return out


def load_model_ref(ref: ModelRef | str | Path) -> TaskFolder:
    """Any model folder (HF classifier, safemerge folder, bare encoder), a safetensors file or a zoo reference.
    The task is `ref.task`; else an HF folder's name (a zoo reference or a zoo-format folder: its manifest's)."""
    ref = ref if isinstance(ref, ModelRef) else ModelRef(path=str(ref))
    path = resolve_path(ref.path)
    return load_task_folder(path, ref.task, name_by_folder=not str(ref.path).startswith("zoo:"))


def base_spec_of(folder: TaskFolder, base: str | None) -> str:
    """The base to check a folder against: the one given, else the one its manifest names."""
    if base:
        return base
    named = folder.manifest.get("base_model") or ZOO_BACKBONES.get(str(folder.manifest.get("backbone")))
    if not named:
        raise SafeMergeError(f"{folder.path}: give its pre-trained base model (--base: an HF folder, or 'text' / "
                             "'vision' for the offline defaults)")
    return str(named)


@dataclass
class Loaded:
    """Task folders checked against one base, with what it takes to feed them."""

    base: Backbone
    base_state: dict[str, torch.Tensor] = field(repr=False)
    base_fp: str
    folders: list[TaskFolder]
    encode: InputEncoder

    @property
    def modality(self) -> str:
        return self.base.modality


def load_checked(refs: list[ModelRef], base_spec: str, max_relative_distance: float = 0.5,
                 max_length: int | None = None, cache: dict | None = None) -> Loaded:
    """Read every folder, load the base with their encoder structure, refuse any that is not a fine-tune of it.

    `cache`: a dict kept by the caller across calls, so a base is loaded once for many models (not modified)."""
    folders = [load_model_ref(r) for r in refs]
    tasks = [f.task for f in folders]
    dup = next((t for t in tasks if tasks.count(t) > 1), None)
    if dup is not None and len(folders) > 1:
        raise SafeMergeError(f"two models have the task name '{dup}': name them apart with `task:`")
    opts = base_options(folders)
    key = (base_spec, tuple(sorted((k, str(v)) for k, v in opts.items())))
    if cache is not None and key in cache:
        loaded_base, base_state, base_fp = cache[key]
    else:
        loaded_base = load_backbone(base_spec, **opts)
        base_state = {k: v.detach().clone() for k, v in loaded_base.model.state_dict().items()}
        base_fp = fingerprint(base_state)
        if cache is not None:
            cache[key] = (loaded_base, base_state, base_fp)
    base = replace(loaded_base)  # the models' own preprocessing is adopted on a copy, the weights are shared
    adopt_preprocessing(base, folders)
    for f in folders:
        check_against_base(f, base_state, base_spec, base_fp, max_relative_distance)
    return Loaded(base, base_state, base_fp, folders, input_encoder(base, folders, max_length))


def adopt_preprocessing(base: Backbone, folders: list[TaskFolder]) -> None:
    """The models' own tokenizer / image processor (the first model folder that has one) over the base's:
    they were fine-tuned and are evaluated with it, and the merged folders are written with it."""
    from .backbones import load_image_processor, load_tokenizer

    for f in folders:
        if not f.path.is_dir():
            continue
        if base.modality == "text" and (tok := load_tokenizer(f.path)) is not None:
            base.tokenizer = tok
            return
        if base.modality == "vision" and (proc := load_image_processor(f.path)) is not None:
            base.processor = proc
            base.image_mean, base.image_std = tuple(proc.image_mean), tuple(proc.image_std)  # type: ignore[assignment]
            return


def input_encoder(base: Backbone, folders: list[TaskFolder], max_length: int | None = None) -> InputEncoder:
    """Text: the base's tokenizer (the models' own, see `adopt_preprocessing`), `max_length` tokens (default:
    the zoo profile's for zoo models, else the tokenizer's limit up to 128). Vision: its image normalisation."""
    tok = base.tokenizer
    if max_length is None:
        prof = next((f.manifest.get("profile") for f in folders if isinstance(f.manifest.get("profile"), dict)), None)
        limit = int(getattr(tok, "model_max_length", 128) or 128) if tok is not None else 128
        max_length = int(prof["max_length"]) if prof else min(128, limit)
    return InputEncoder(modality=base.modality, tokenizer=tok, max_length=max_length, image_mean=base.image_mean,
                        image_std=base.image_std)


def image_converter(base: Backbone):
    """PIL images -> uint8 [N, 3, R, R] as the base's image processor resizes and crops them (None: the data
    reader's default resize to the encoder's image size)."""
    proc = base.processor
    if proc is None:
        return None

    def convert(images):
        px = proc(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        return px if px.dtype == torch.uint8 else px.round().clamp(0, 255).to(torch.uint8)
    return convert


def read_data(path: str, loaded: Loaded, folder: TaskFolder | None, opts: DataOptions | None = None,
              require_labels: bool = False) -> UserData:
    """A user's data file for one task, with labels mapped through the model's own label names."""
    opts = opts or DataOptions()
    if opts.resolution and loaded.modality == "vision" and opts.resolution != loaded.base.image_size \
            and not loaded.base.any_resolution:
        raise SafeMergeError(f"--resolution {opts.resolution}: {loaded.base.model_type or 'this'} encoders "
                             f"take {loaded.base.image_size}-px images only (DINOv2 takes any side)")
    head = folder.head if folder is not None else None
    labels = folder.labels.get(folder.task) if folder is not None else None
    names = labels if labels and not all(n.startswith("LABEL_") or n.isdigit() for n in labels) else None
    return load_data(Path(path).expanduser(), modality=loaded.modality, text_column=opts.text_column,
                     image_column=opts.image_column, label_column=opts.label_column, label_names=names,
                     num_labels=head.num_labels if head is not None else None,
                     images=None if opts.resolution else image_converter(loaded.base),
                     resolution=opts.resolution or loaded.base.image_size or 224, limit=opts.limit,
                     require_labels=require_labels)


# ------------------------------------------------------------------------------------------------ merging


def merge_models(cfg: MergeConfig) -> Path:
    """Merge the config's models; write one task folder per model under `cfg.output` (merged encoder + the
    model's own head), a merge manifest and a model card; with labeled data, evaluate and put the table in
    the card. With `streaming`, merge checkpoint files tensor by tensor instead (encoder only)."""
    if cfg.streaming:
        from .merging.streaming import streaming_merge

        base_path = resolve_backbone_path(cfg.base_model) if cfg.base_model in ("vision", "text") else cfg.base_model
        return streaming_merge(cfg.method, base_path, [resolve_path(m.path) for m in cfg.models], cfg.output,
                               cfg.parameters, out_dtype=cfg.out_dtype, max_shard_size=cfg.max_shard_size,
                               max_relative_distance=cfg.max_relative_distance)
    t0 = time.time()
    loaded = load_checked(cfg.models, cfg.base_model, cfg.max_relative_distance, cfg.data_options.max_length)
    datas = [read_data(m.data, loaded, f, cfg.data_options) if m.data else None
             for m, f in zip(cfg.models, loaded.folders)]
    state, info = run_method(cfg.method, loaded, datas, cfg.parameters, cfg.seed)
    seconds = round(time.time() - t0, 1)
    rows = evaluate_merged(loaded, state, cfg.models, datas)
    out = Path(cfg.output).expanduser()
    inputs = [{"task": f.task, "path": str(f.path), "fingerprint": fingerprint(f.encoder_state),
               "data": m.data, "data_sha256": _file_digest(m.data)} for m, f in zip(cfg.models, loaded.folders)]
    manifest = {"merge": {"method": cfg.method, "parameters": cfg.parameters, "seed": cfg.seed, "inputs": inputs,
                          "seconds": seconds},
                "base_model": cfg.base_model, "base_fingerprint": loaded.base_fp,
                "merged_fingerprint": fingerprint(state), "evaluation": rows}
    card = model_card(cfg, loaded, inputs, rows, info)
    from .io import atomic_dir, atomic_write_json

    with atomic_dir(out) as tmp:
        for f in loaded.folders:
            source, extra = _from_source(f)
            save_task_folder(tmp / f.task, loaded.base, state, f.head, f.task, {**manifest, **source, "tasks": [
                             x.task for x in loaded.folders]}, labels=f.labels.get(f.task), card=card, extra_files=extra)
        atomic_write_json(tmp / MANIFEST, {**manifest, "tasks": [f.task for f in loaded.folders]})
        (tmp / "README.md").write_text(card)
        tmp.chmod(0o755)
        for p in (tmp / MANIFEST, tmp / "README.md"):
            p.chmod(0o644)
    return out


def _from_source(folder: TaskFolder) -> tuple[dict, dict | None]:
    """What a merged task folder keeps of its source zoo model: the data recipe (`profile`, `seed`) and the
    recorded backdoor (attack and learned trigger), so `eval` scores it on its task's test split at the
    source's input size and measures ASR with the trigger planted in that task's model, not a default one."""
    kept = {k: folder.manifest[k] for k in ("profile", "seed") if folder.manifest.get(k) is not None}
    if not folder.manifest.get("attack"):
        return kept, None
    return {**kept, "source_attack": folder.manifest["attack"],
            "source_attack_params": folder.manifest.get("attack_params", {})}, _trigger_files(folder.path)


def _trigger_files(path: Path) -> dict[str, dict[str, torch.Tensor]] | None:
    """A zoo model's learned trigger (`trigger.safetensors`), to carry into a folder written from it."""
    from .io import load_state_dict

    trig = path / "trigger.safetensors"
    return {trig.name: load_state_dict(trig)} if path.is_dir() and trig.exists() else None


def run_method(method: str, loaded: Loaded, datas: list[UserData | None], params: dict, seed: int = 0):
    """Run any registered method on checked folders: data-free ones get the weights, data-driven ones the
    heads and each model's unlabeled examples too."""
    from .merging.methods import METHODS, merge
    from .merging.pool import Pool, is_pool_method, run_pool_method

    models = [f.encoder_state for f in loaded.folders]
    if method in METHODS:
        return merge(method, loaded.base_state, models, **params), {}
    if not is_pool_method(method):
        from .merging.pool import POOL_METHODS

        raise SafeMergeError(f"unknown merge method '{method}' (known: {', '.join([*METHODS, *POOL_METHODS])})")
    for f, d in zip(loaded.folders, datas):
        if f.head is None:
            raise SafeMergeError(f"{f.path}: has no classification head; '{method}' needs each model's head "
                                 "(an HF *ForSequenceClassification / *ForImageClassification folder)")
        if d is None:
            raise SafeMergeError(f"{f.path}: '{method}' needs examples of each model's task: give `data:` for it")
    xs = [d.split.x for d in datas]  # type: ignore[union-attr]
    pool = Pool(loaded.base.model, loaded.base_state, models, [f.head for f in loaded.folders], xs, xs,  # type: ignore[misc]
                loaded.encode, seed=seed)
    return run_pool_method(method, pool, **params)


def evaluate_merged(loaded: Loaded, state: dict, refs: list[ModelRef], datas: list[UserData | None]) -> list[dict]:
    """ACC (and ASR with a trigger) of the merged encoder under each task's head, where labeled data is given."""
    rows = []
    for ref, f, d in zip(refs, loaded.folders, datas):
        d_eval = d if ref.eval_data is None else read_data(ref.eval_data, loaded, f, require_labels=True)
        if d_eval is None or not d_eval.labeled or f.head is None:
            continue
        trig = parse_trigger(ref.trigger, target=ref.target) if ref.trigger else None
        rows.append(_eval_row(loaded, state, f, d_eval, trig))
    return rows


def _eval_row(loaded: Loaded, state: dict, folder: TaskFolder, data: UserData, trigger) -> dict:
    import copy

    enc = copy.deepcopy(loaded.base.model)
    enc.load_state_dict(state)
    model = TaskModel(enc, folder.head, loaded.modality)  # type: ignore[arg-type]
    acc, asr, untriggered = attack_rates(model, loaded.encode, data.split, trigger)
    row = {"task": folder.task, "acc": round(acc, 2), "examples": len(data), "data": data.source}
    if trigger is not None:  # with the share the model sends to the target anyway (a collapsed model: ASR 100)
        row.update({"asr": round(asr, 2), "asr_untriggered": round(untriggered, 2), "trigger": trigger.name,
                    "target": trigger.target})
    return row


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def model_card(cfg: MergeConfig, loaded: Loaded, inputs: list[dict], rows: list[dict], info: dict) -> str:
    """README.md of a merged output: method, parameters, inputs with fingerprints, evaluation."""
    lines = ["---", "library_name: transformers", "tags: [safemerge, merge, " + cfg.method + "]", "---", "",
             f"# Merged with safemerge: `{cfg.method}`", "",
             f"Base model: `{cfg.base_model}` (fingerprint `{loaded.base_fp}`). One folder per task: the merged "
             "encoder with that task's own head; load it with `AutoModelForSequenceClassification` / "
             "`AutoModelForImageClassification.from_pretrained(<output>/<task>)`.", "",
             "## Parameters", "", "```", *(f"{k}: {v}" for k, v in (cfg.parameters or {"(defaults)": ""}).items()),
             f"seed: {cfg.seed}", "```", "", "## Inputs", "", "| task | model | fingerprint | data | data sha256 |",
             "|---|---|---|---|---|"]
    lines += [f"| {i['task']} | `{i['path']}` | `{i['fingerprint']}` | {i['data'] or '-'} | {i['data_sha256'] or '-'} |"
              for i in inputs]
    if rows:
        lines += ["", "## Evaluation (merged model)", "", "| task | ACC % | ASR % | trigger | examples |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['acc']:.2f} | {r.get('asr', '-')} | {r.get('trigger', '-')} | {r['examples']} |"
                  for r in rows]
    if info.get("mask_density") is not None:
        lines += ["", f"Mask density: {info['mask_density']}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_folder(path: str | Path, data: str | None = None, trigger: str | None = None, target: int = 0,
                    base: str | None = None, tasks: list[str] | None = None, profile: str | None = None,
                    attack: str | None = None, data_options: DataOptions | None = None) -> list[dict]:
    """ACC (and ASR with a trigger) of a model folder on the user's labeled data; with no data, a zoo
    model's own test split (`profile`)."""
    if data is None:
        return _evaluate_on_zoo_data(path, profile, attack, tasks)
    folder = load_model_ref(str(path))
    if folder.head is None:
        raise SafeMergeError(f"{folder.path}: no head for task '{folder.task}' (heads: "
                             f"{', '.join(folder.heads) or 'none'}); a classification head is needed to evaluate")
    spec = base or folder.manifest.get("base_model") or ZOO_BACKBONES.get(str(folder.manifest.get("backbone")))
    opts = data_options or DataOptions()
    if spec:
        loaded = load_checked([ModelRef(path=str(path), task=folder.task)], str(spec), max_length=opts.max_length)
    else:  # no base needed to evaluate: the folder's own encoder
        loaded = _standalone(folder, opts.max_length)
    f = loaded.folders[0]
    d = read_data(data, loaded, f, opts, require_labels=True)
    trig = parse_trigger(trigger, target=target) if trigger else None
    return [_eval_row(loaded, f.encoder_state, f, d, trig)]


def _standalone(folder: TaskFolder, max_length: int | None) -> Loaded:
    """A folder evaluated alone: its own encoder is the `base` of the evaluation."""
    import copy

    from .backbones import load_image_processor, load_tokenizer
    from .folders import _modality

    if folder.encoder is None:
        raise SafeMergeError(f"{folder.path}: give --base to evaluate a safemerge folder")
    modality = _modality(folder.config)
    bb = Backbone(copy.deepcopy(folder.encoder), modality, folder.path.name, folder.path)  # type: ignore[arg-type]
    if modality == "text":
        bb.tokenizer = load_tokenizer(folder.path)
    else:
        cfg = getattr(folder.encoder.config, "vision_config", folder.encoder.config)  # type: ignore[union-attr]
        bb.image_size = int(getattr(cfg, "image_size", 224))
        bb.processor = load_image_processor(folder.path)
        if bb.processor is not None:
            bb.image_mean, bb.image_std = tuple(bb.processor.image_mean), tuple(bb.processor.image_std)  # type: ignore[assignment]
    state = dict(folder.encoder_state)
    return Loaded(bb, state, fingerprint(state), [folder], input_encoder(bb, [folder], max_length))


def _evaluate_on_zoo_data(path, profile: str | None, attack: str | None, tasks: list[str] | None) -> list[dict]:
    """A zoo model (or a merge of zoo models) on its tasks' test splits."""
    from .bench.attacks import make_attack
    from .bench.suites import PoolEvaluator
    from .bench.tasks import TASKS
    from .bench.zoo import Zoo, attack_of

    from dataclasses import fields

    from .bench.zoo import Profile

    path = resolve_path(str(path))
    zm = load_task_folder(path)
    spec = zm.manifest.get("base_model") or ZOO_BACKBONES.get(str(zm.manifest.get("backbone")))
    known = [t for t in zm.heads if t in TASKS]
    if not zm.heads or not known or spec is None:
        raise SafeMergeError(f"{path}: not a zoo model; give its labeled data with --data FILE "
                             "(JSONL, CSV, a save_to_disk folder or an image folder)")
    mp = zm.manifest.get("profile")
    own = Profile(**mp) if isinstance(mp, dict) and set(mp) <= {f.name for f in fields(Profile)} else None
    zoo = Zoo(str(spec), profile or own or "quick", seed=int(zm.manifest.get("seed") or 0))
    ev = PoolEvaluator(zoo)
    # a merged folder has no attack of its own: it keeps the one planted in its task's source model
    own = attack_of(zm.manifest, zm.path) or attack_of(
        {"attack": zm.manifest.get("source_attack"), "attack_params": zm.manifest.get("source_attack_params", {})},
        zm.path)
    rows = []
    for t in tasks or known:
        if t not in zm.heads:
            raise SafeMergeError(f"{path}: no head for task '{t}' (heads: {', '.join(zm.heads)})")
        atk = make_attack(attack, seed=zoo.seed) if attack else own
        acc, asr, untriggered = ev.rates(zm.encoder_state, zm.heads[t], t, atk)
        rows.append({"task": t, "acc": round(acc, 2), "asr": round(asr, 2), "asr_untriggered": round(untriggered, 2),
                     "trigger": ev.trigger_for(t, atk).name})
    return rows


# ---------------------------------------------------------------------------------------- scan and purify


def load_suspect(model: str, base: str | None = None, profile: str | None = None, data: str | None = None,
                 data_options: DataOptions | None = None, require_labels: bool = True, val_share: float = 0.3,
                 seed: int = 0, cache: dict | None = None):
    """A model folder (or zoo reference) checked against its base, with examples of its task: the user's
    `data` (split by `seed` into clean training examples and `val_share` held out), else, for a zoo model,
    its task's training and validation splits under `profile` (default: the model's own)."""
    from .safety.purify import Suspect

    folder = load_model_ref(str(model))
    spec = base_spec_of(folder, base)
    if folder.head is None:
        raise SafeMergeError(f"{folder.path}: no classification head for task '{folder.task}' (heads: "
                             f"{', '.join(folder.heads) or 'none'})")
    opts = data_options or DataOptions()
    loaded = load_checked([ModelRef(path=str(folder.path), task=folder.task)], spec, max_length=opts.max_length,
                          cache=cache)
    f = loaded.folders[0]
    if data is not None:
        d = read_data(data, loaded, f, opts, require_labels=require_labels)
        if len(d) < 4:
            raise SafeMergeError(f"{d.source}: {len(d)} examples are too few (at least 4: some are held out)")
        perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))
        n_val = max(2, int(round(val_share * len(d))))
        train, val = d.split.subset(perm[n_val:]), d.split.subset(perm[:n_val])
        texts = list(d.split.x) if loaded.modality == "text" else []
    else:
        train, val, texts = _zoo_splits(f, profile, loaded, opts.resolution)
    return Suspect(f.path, f.manifest, f.encoder_state, f.head, f.task, loaded.base, loaded.base_state, train,  # type: ignore[arg-type]
                   val, loaded.encode, texts)


def _zoo_splits(folder: TaskFolder, profile: str | None, loaded: Loaded,
                resolution: int | None = None) -> tuple[Split, Split, list[str]]:
    """A zoo model's task data (train, validation, unlabeled val + test texts), or an error asking for data
    (or refusing a `resolution`, which only resizes the user's data: the task's split comes at its profile's)."""
    from dataclasses import fields

    from .bench.tasks import TASKS
    from .bench.zoo import Profile, get_profile, task_data

    if folder.task not in TASKS:
        raise SafeMergeError(f"{folder.path}: give examples of its task with --data FILE (JSONL, CSV, a "
                             "save_to_disk folder or an image folder)")
    if resolution:
        raise SafeMergeError(f"--resolution {resolution} resizes --data; without it, {folder.path.name} is "
                             f"scanned on its task's split at its profile's side (choose that with --profile)")
    mp = folder.manifest.get("profile")
    if profile is not None:
        prof = get_profile(profile)
    elif isinstance(mp, dict) and set(mp) <= {f.name for f in fields(Profile)} and "name" in mp:
        prof = Profile(**mp)
    else:
        prof = get_profile("quick")
    data = task_data(folder.task, prof, int(folder.manifest.get("seed") or 0))
    if data.spec.modality != loaded.modality:
        raise SafeMergeError(f"{folder.path}: task '{folder.task}' is {data.spec.modality}, the base is {loaded.modality}")
    if folder.head is not None and folder.head.num_labels != data.num_classes:
        raise SafeMergeError(f"{folder.path}: head '{folder.task}' has {folder.head.num_labels} labels; the task "
                             f"has {data.num_classes} classes")
    loaded.encode.max_length = prof.max_length
    texts = list(data.val.x) + list(data.test.x) if loaded.modality == "text" else []
    return data.train, data.val, texts


def scan_models(models: list[str], base: str | None = None, profile: str | None = None, data: str | None = None,
                n_inputs: int = 32, seed: int = 0, cache: dict | None = None, resolution: int | None = None,
                **options) -> list:
    """Scan model folders (or zoo references) for backdoors with unlabeled examples (`data`, or a zoo model's
    validation split; images resized to `resolution` if given); `options` go to `safety.scan.scan_suspect`.
    The base is loaded once for all models. Every model is loaded and checked against the base and the data
    before the first scan, so a bad folder or data file fails at once, not after the other models' scans."""
    from .safety.scan import scan_suspect

    cache = {} if cache is None else cache
    opts = DataOptions(resolution=resolution)

    def load(m: str):
        return load_suspect(m, base, profile, data, opts, require_labels=False, seed=seed, cache=cache)

    if len(models) > 1:
        for m in models:  # checks only; each is loaded again to scan, so only one model is held at a time
            load(m)
    return [scan_suspect(load(m), n_inputs=n_inputs, seed=seed, **options) for m in models]


def purify_model(model: str, out: str, method: str = "fine-mixing", clean_fraction: float = 0.05,
                 base: str | None = None, profile: str | None = None, data: str | None = None,
                 resolution: int | None = None, **options) -> tuple[Path, dict]:
    """Purify a model folder (or zoo reference) and write the result as a model folder at `out`, atomically:
    the same head, the source's manifest (so `eval` still measures a zoo model's trigger) with a `purified`
    block. With `data` (clean labeled examples of the task) all of it is used: 30% held out to judge the
    keep ratio. `options` go to `safety.purify.purify_state`."""
    from .safety.purify import purify_state

    s = load_suspect(model, base, profile, data, DataOptions(resolution=resolution))
    state, summary = purify_state(s, method, 1.0 if data else clean_fraction, **options)  # type: ignore[arg-type]
    manifest = {**s.manifest, "purified": {**summary, "source": str(s.path)},
                "base_model": base_spec_of(load_model_ref(str(s.path)), base), "base_fingerprint": fingerprint(s.base),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    extra = _trigger_files(s.path)
    folder = load_task_folder(s.path)
    path = save_task_folder(out, s.backbone, state, s.head, s.task, manifest, labels=folder.labels.get(s.task),
                            extra_files=extra)
    return path, summary


# -------------------------------------------------------------------------------------------------- export


def export_model(model: str, out: str | Path, data_out: str | Path | None = None, split: str = "test",
                 base: str | None = None) -> tuple[Path, Path | None]:
    """Write a zoo (or safemerge) model as a plain transformers classification folder, and optionally its
    task's `split` as JSONL (text) or an image folder (vision): what a user of another tool would have."""
    from .data import save_image_folder, save_jsonl

    folder = load_model_ref(str(model))
    spec = base_spec_of(folder, base)
    loaded = load_checked([ModelRef(path=str(folder.path), task=folder.task)], spec)
    f = loaded.folders[0]
    prof = f.manifest.get("profile")
    if loaded.base.tokenizer is not None and isinstance(prof, dict):
        loaded.base.tokenizer.model_max_length = int(prof["max_length"])  # the length the model was trained at
    if loaded.modality == "vision" and isinstance(prof, dict) and loaded.base.processor is None:
        from transformers import ViTImageProcessor  # resize to the side the model was trained at, normalise

        side = int(prof["resolution"])
        loaded.base.processor = ViTImageProcessor(size={"height": side, "width": side}, image_mean=list(
            loaded.base.image_mean), image_std=list(loaded.base.image_std))
    extra = _trigger_files(f.path)
    manifest = {k: v for k, v in f.manifest.items() if k not in ("format", "created")}
    path = save_task_folder(out, loaded.base, f.encoder_state, f.head, f.task,
                            {**manifest, "exported_from": str(f.path), "base_model": spec},
                            labels=f.labels.get(f.task), extra_files=extra, require_transformers=True)
    if data_out is None:
        return path, None
    if split not in ("train", "val", "test"):
        raise SafeMergeError(f"unknown split '{split}' (known: train, val, test)")
    from .bench.tasks import TASKS
    from .bench.zoo import Profile, get_profile, task_data

    if f.task not in TASKS:
        raise SafeMergeError(f"{f.path}: task '{f.task}' is not a zoo task: there is no data to export")
    profile = Profile(**prof) if isinstance(prof, dict) else get_profile("quick")
    data = task_data(f.task, profile, int(f.manifest.get("seed") or 0))
    sp = getattr(data, split)
    classes = list(data.spec.classes)
    if loaded.modality == "text":
        return path, Path(save_jsonl(data_out, sp, classes))
    folder = Path(save_image_folder(data_out, sp, classes))
    # beside it, the same images as JSONL rows in the split's own order (an image folder is read class by class)
    width = max(5, len(str(len(sp))))
    rows = [{"image": f"{folder.name}/{classes[c]}/{i:0{width}d}.png", "label": c} for i, c in enumerate(sp.y.tolist())]
    from .io import atomic_write_text

    atomic_write_text(folder.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return path, folder


# ---------------------------------------------------------------------------------------------- protection


def protect_model(model: str | Path, out: str | Path, base_model: str | None = None, dropout: float = 0.0,
                  permute: bool = True, scale: bool = True, seed: int = 0) -> Path:
    """Write a protected copy of a model folder: same outputs alone, broken in any merge (see `protect`)."""
    from .safety.protect import protect_state

    folder = load_model_ref(str(model))
    spec = base_spec_of(folder, base_model)
    loaded = load_checked([ModelRef(path=str(model), task=folder.task)], spec)
    f = loaded.folders[0]
    state = protect_state(f.encoder_state, loaded.base_state, permute=permute, scale=scale, dropout=dropout, seed=seed)
    manifest = {**f.manifest, "protected": {"permute": permute, "scale": scale, "dropout": dropout, "seed": seed,
                                            "source": str(f.path)},
                "base_model": spec, "base_fingerprint": loaded.base_fp,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return save_task_folder(out, loaded.base, state, f.head, f.task, manifest, labels=f.labels.get(f.task))


__all__ = ["Loaded", "evaluate_folder", "load_checked", "load_model_ref", "load_suspect", "merge_models",
           "export_model", "protect_model", "purify_model", "read_data", "resolve_path", "run_method", "scan_models"]
