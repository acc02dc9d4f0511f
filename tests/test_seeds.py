"""Seeds and error bars: a suite run per seed, seeds added to an existing results file, mean ± sd rows; the
prototype head, backdoor knobs and extra test examples of the zoo profile."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safemerge.bench.report import aggregate_setting, mean_sd, setting_table
from safemerge.bench.suites import (Setting, Suite, get_suite, parse_seeds, previous_seeds, run_suite, setting_models,
                                    suite_profile, suite_recipe)
from safemerge.bench.zoo import PROFILES, Profile, Zoo, override_profile, profile_attack_params, profile_digest
from safemerge.cli import app
from safemerge.errors import SafeMergeError

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "results.schema.json"
SMALL = Profile("tiny", resolution=28, n_train=128, n_val=16, n_test=48, steps=6, batch_size=16, lr=5e-4,
                head_lr=5e-3, trigger_iters=3, embedding_steps=4, head="prototype")  # prototype: no probe to fit
runner = CliRunner()


def test_mean_sd_and_aggregation_of_two_seeds():
    assert mean_sd([1.0, 3.0]) == (2.0, round(math.sqrt(2), 2)) and mean_sd([5.0]) == (5.0, None)
    rows = lambda a, b: [{"method": "ta", "task": "x", "acc": a, "asr": b}, {"method": "ta", "task": "y", "acc": 50.0,
                                                                            "asr": 10.0}]
    st = lambda a, b: {"name": "s", "backdoored_tasks": ["x"], "rows": rows(a, b), "seconds": {"ta": 2.0}}
    agg = aggregate_setting([(0, st(80.0, 90.0)), (1, st(90.0, 70.0))])
    x = next(r for r in agg["rows"] if r["task"] == "x")
    assert (x["acc"], x["asr"], x["sd"]["acc"], x["sd"]["asr"], x["n"]) == (85.0, 80.0, 7.07, 14.14, 2)
    summ = agg["summary"]["ta"]  # per seed first (ACC(all) 65 and 70), then mean and sd
    assert summ["acc_all"] == 67.5 and summ["sd"]["acc_all"] == 3.54 and summ["asr_b"] == 80.0
    table = setting_table(agg)
    assert "85.00 ± 7.07" in table and "67.50 ± 3.54" in table
    one = aggregate_setting([(0, st(80.0, 90.0))])
    assert one["rows"][0]["sd"] == {"acc": None, "asr": None} and "±" not in setting_table(one)


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("0-2") == [0, 1, 2] and parse_seeds("2") == [2]
    with pytest.raises(SafeMergeError, match="--seeds"):
        parse_seeds("a,b")


def test_suite_over_two_seeds_added_one_at_a_time(tiny_vision, tmp_path):
    """Seed 0, then seed 1 alone: the file holds both, its rows are the mean with sd, tables print mean ± sd,
    and it still validates against the shared results schema."""
    suite = Suite("tiny-seeds", str(tiny_vision), SMALL, ["digits", "mnist"],
                  [Setting("1bd+1clean", {"digits": "badnets"})],
                  methods=[("task_arithmetic", "task_arithmetic", {"scaling": 0.3}),
                           ("dam", "dam", {"mask_steps": 2, "adamerging_steps": 1, "effect_examples": 8}),
                           ("dam_reference", "dam", {"mask_steps": 2, "adamerging_steps": 1, "effect_examples": 8,
                                                     "perturbation": "reference", "inner": "exact"})])
    out = tmp_path / "results"
    kw = {"results_dir": out, "zoo_root": tmp_path / "zoo", "progress": False}
    first = run_suite(suite, seeds=[0], **kw)
    assert first["seeds"] == [0] and all(r["sd"]["acc"] is None for r in first["settings"][0]["rows"])
    res = run_suite(suite, seeds=[1], **kw)
    data = json.loads((out / "tiny-seeds.json").read_text())
    assert data == json.loads(json.dumps(res))
    if SCHEMA.exists():
        import jsonschema

        jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    assert data["seeds"] == [0, 1] and set(data["per_seed"]) == {"0", "1"} and "incomplete" not in data
    heads = data["heads"]  # the pre-trained encoder under each frozen head (the zero-shot row), over seeds
    assert set(heads) == {"digits", "mnist"} and heads["digits"]["kind"] == "prototype" and heads["digits"]["n"] == 2
    assert data["command"].endswith("--seeds 0,1")
    st, per = data["settings"][0], [data["per_seed"][k]["settings"][0] for k in ("0", "1")]
    assert st["seeds"] == [0, 1]
    for r in st["rows"]:  # rows are the mean of the seeds' rows, with their sd
        accs = [next(x["acc"] for x in p["rows"] if (x["method"], x["task"]) == (r["method"], r["task"])) for p in per]
        assert r["acc"] == mean_sd(accs)[0] and r["sd"]["acc"] == mean_sd(accs)[1] and r["n"] == 2
    assert set(st["summary"]["dam"]["sd"]) == {"acc_b", "acc_all", "asr_b", "asr_all"}
    # the seeds' zoos differ (own data split and fine-tuning): seed folders side by side
    assert len({p.name for p in (tmp_path / "zoo").iterdir()}) == 2
    # DAM rows record their perturbation's effect, per seed and over seeds
    eff = st["perturbation_effect"]
    assert set(eff) == {"dam", "dam_reference"} and set(eff["dam"]["per_task"]) == {"digits", "mnist"}
    assert per[0]["perturbation_effect"]["dam_reference"]["updates"] == 2
    assert per[0]["perturbation_effect"]["dam"]["perturbation"] == "amortized"
    assert 0 <= eff["dam"]["flip_rate"] <= 100 and "flip_rate_clamp_only" in eff["dam_reference"]
    md = (out / "tiny-seeds.md").read_text()
    assert "±" in md and "over 2 seeds (0, 1)" in md and "flip rate" in md and "pre-trained ACC" in md
    assert (out / "tiny-seeds-1bd+1clean.png").stat().st_size > 1000
    # another recipe does not mix with these seeds
    assert set(previous_seeds(out / "tiny-seeds.json", suite_recipe(suite))) == {0, 1}
    other = Suite(**{**suite.__dict__, "eval_examples": 10})
    assert previous_seeds(out / "tiny-seeds.json", suite_recipe(other)) == {}


def test_a_seed_that_stopped_resumes_at_its_first_unfinished_setting(tiny_vision, tmp_path):
    """A run that stopped after its first setting left `incomplete` in the file: running the seed again keeps
    that setting's rows (not rerun) and runs only the missing one."""
    suite = Suite("tiny-resume", str(tiny_vision), SMALL, ["digits", "mnist"],
                  [Setting("1bd+1clean", {"digits": "badnets"}), Setting("2bd", {"digits": "badnets", "mnist": "badnets"})],
                  methods=[("task_arithmetic", "task_arithmetic", {"scaling": 0.3})])
    out = tmp_path / "results"
    kw = {"results_dir": out, "zoo_root": tmp_path / "zoo", "progress": False}
    run_suite(suite, seeds=[0], **kw)
    path = out / "tiny-resume.json"
    data = json.loads(path.read_text())
    stopped = data["per_seed"]["0"]
    stopped["settings"] = stopped["settings"][:1]  # as a run stopped after its first setting writes it
    stopped["settings"][0]["rows"][0]["acc"] = -1.0  # a marker: a rerun setting would not keep it
    stopped["incomplete"] = "1 of 2 settings"
    stopped["seconds"] = {"zoo": 100.0, "merge_and_eval": 50.0, "total": 150.0}
    data["incomplete"] = "seed 0: 1 of 2 settings"
    path.write_text(json.dumps(data))
    res = run_suite(suite, seeds=[0], **kw)
    seed0 = res["per_seed"]["0"]
    assert "incomplete" not in res and "incomplete" not in seed0 and seed0["resumed"] is True
    assert [st["name"] for st in seed0["settings"]] == ["1bd+1clean", "2bd"]
    assert seed0["settings"][0]["rows"][0]["acc"] == -1.0
    assert seed0["seconds"]["total"] > 150.0 and seed0["seconds"]["zoo"] >= 100.0
    sm = setting_models(suite, "2bd", seed=0, zoo_root=tmp_path / "zoo")  # what the benchmark scripts tune on: the same models, triggers, heads
    assert set(sm.models) == {("digits", None), ("mnist", None), ("digits", "badnets"), ("mnist", "badnets")}
    assert set(sm.triggers) == {"digits", "mnist"} and set(sm.heads) == {"digits", "mnist"}
    with pytest.raises(SafeMergeError, match="unknown setting 'nope'"):
        setting_models(suite, "nope")
    # --fresh starts the seed over
    again = run_suite(suite, seeds=[0], fresh=True, **kw)
    assert again["per_seed"]["0"]["settings"][0]["rows"][0]["acc"] >= 0 and "resumed" not in again["per_seed"]["0"]


def test_profile_additions_keep_old_zoo_names_and_set_attacks():
    # zoos built before these fields existed keep their folder names
    assert profile_digest(PROFILES["quick"], "vision") == "1ec16f43"
    assert profile_digest(PROFILES["full"], "text") == "e30522ba"
    strong = Profile("quick", head="prototype", poison_rate=0.3, trigger_frac=0.25, trigger_repeats=2, attack_steps=120)
    assert profile_digest(strong, "vision") != "1ec16f43"
    assert profile_attack_params(strong, "badnets") == {"poison_rate": 0.3, "patch_frac": 0.25}
    assert profile_attack_params(strong, "rare_word") == {"poison_rate": 0.3, "repeats": 2}
    assert profile_attack_params(PROFILES["quick"], "badnets") == {}


def test_prototype_head_is_linear_without_bias_and_backdoor_knobs_apply(tiny_vision, tmp_path):
    proto = Profile("tiny", resolution=28, n_train=128, n_val=16, n_test=48, steps=4, batch_size=16, lr=5e-4,
                    head="prototype", logit_scale=30.0, poison_rate=0.3, trigger_frac=0.25, attack_steps=6)
    zoo = Zoo(str(tiny_vision), proto, root=tmp_path / "zoo")
    head = zoo.probe_head("digits")
    assert not head.bias.any()
    feats_norm = head.weight.norm(dim=1)  # logit_scale * unit prototype / mean feature norm: equal row norms
    assert torch.allclose(feats_norm, feats_norm[0].expand_as(feats_norm), rtol=1e-4)
    p = zoo.build("digits", "badnets")
    m = json.loads((p / "safemerge.json").read_text())
    assert m["attack_params"]["poison_rate"] == 0.3 and m["attack_params"]["patch_frac"] == 0.25
    assert m["profile"]["head"] == "prototype" and m["head"]["kind"] == "prototype"
    assert 0 <= m["head"]["pretrained_acc"] <= 100


def test_prototype_head_model_exports_and_scores_as_the_zoo(tiny_vision, tmp_path):
    proto = Profile("tiny", resolution=28, n_train=128, n_val=16, n_test=48, steps=4, batch_size=16, lr=5e-4,
                    head="prototype")
    zoo = Zoo(str(tiny_vision), proto, root=tmp_path / "zoo")
    src = zoo.build("digits", None)
    res = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "hf"), "--data-out", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForImageClassification

    hf = AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    assert not hf.classifier.bias.any()
    got = runner.invoke(app, ["eval", str(tmp_path / "hf"), "--data", str(tmp_path / "data"), "--json"])
    ref = runner.invoke(app, ["eval", str(src), "--json"])
    assert got.exit_code == 0 and ref.exit_code == 0, got.output + ref.output
    assert json.loads(got.stdout)[0]["acc"] == json.loads(ref.stdout)[0]["acc"]


def test_test_split_past_the_profile_adds_held_apart_examples(tiny_vision, tmp_path):
    zoo = Zoo(str(tiny_vision), SMALL, root=tmp_path / "zoo")
    data = zoo.data("mnist")
    assert torch.equal(zoo.test_split("mnist", 20).y, data.test.y[:20])
    big = zoo.test_split("mnist", 100)
    assert len(big) == 100 and torch.equal(big.y[:48], data.test.y) and torch.equal(big.x[:48], data.test.x)
    extra = big.x[48:].flatten(1)
    for part in (data.train.x, data.val.x, data.test.x):  # disjoint from every split the models saw
        same = (extra[:, None, :] == part.flatten(1)[None]).all(-1)
        assert not same.any()


def test_profile_overrides_and_cli_errors():
    from safemerge.bench.zoo import override_profile

    p = override_profile(PROFILES["quick"], ["head=prototype", "resolution=56", "attack_steps=none", "poison_rate=0.2"])
    assert (p.head, p.resolution, p.attack_steps, p.poison_rate, p.name) == ("prototype", 56, None, 0.2, "quick")
    for bad, msg in ((["head=cosine"], "head must be"), (["steps=many"], "not a valid int"), (["nope=1"], "KEY one of")):
        with pytest.raises(SafeMergeError, match=msg):
            override_profile(PROFILES["quick"], bad)
    for args, msg in ((["--seeds", "0,x"], "--seeds"), (["--profile-set", "head=cosine"], "head must be"),
                      (["--eval-examples", "0"], "--eval-examples")):
        res = runner.invoke(app, ["bench", "--suite", "vision-quick", *args])
        assert res.exit_code == 2 and res.output.strip().startswith("error:") and msg in res.output, res.output


def test_core_suites_are_zoo_v2_and_match_the_same_recipe_given_by_override():
    """The core suites run on prototype heads and merge-aware backdoors; the same profile given by override is
    the same recipe, so seeds run either way are added to one results file."""
    for name in ("vision-core", "text-core"):
        s = get_suite(name)
        assert s.profile == "core" and suite_profile(s).head == "prototype" and [st.name for st in s.settings] == ["2bd+4clean", "4bd+2clean"]
        assert not s.defenses and s.eval_examples == 1000
        assert {"regmean", "adamerging_layer", "concrete_am_layer", "dam", "dam_reference"} <= {m[0] for m in s.methods}
        assert {a for st in s.settings for a in st.backdoored.values()} == {"badmerging", "badmerging_text"} - {
            "badmerging_text" if name == "vision-core" else "badmerging"}
        same = replace(s, profile=override_profile(PROFILES["quick"], ["head=prototype", "attack_steps=120"]))
        assert suite_recipe(same) == suite_recipe(s)
        other = replace(s, profile=PROFILES["quick"])
        assert suite_recipe(other) != suite_recipe(s)
        assert suite_recipe(s) == {"vision-core": "73c773cad696", "text-core": "cd3519f766d4"}[name]  # seeds kept
    # the demo: 4 of vision-core's tasks and its models (zoo:vision/core/...), both BadMerging ones
    demo, core = get_suite("vision-demo"), get_suite("vision-core")
    assert suite_profile(demo) == suite_profile(core) and set(demo.needed_models()) < set(core.needed_models())
    assert set(demo.settings[0].backdoored.items()) == set(core.settings[0].backdoored.items())
    # its zoo folders: backdoored models in quick-cecdadf5-s<seed>, clean ones in quick-ed8a1a35-s<seed>
    assert profile_digest(suite_profile(core), "vision") == "cecdadf5"
    assert profile_digest(replace(suite_profile(core), attack_steps=None), "vision") == "ed8a1a35"


def test_backdoor_knobs_share_the_clean_models_and_heads(tiny_vision, tmp_path):
    """A recipe that only strengthens the backdoors reuses the clean models and heads of the recipe without
    those knobs (they are the same models), and keeps its backdoored models apart."""
    plain = replace(SMALL, steps=3)
    strong = replace(plain, poison_rate=0.3, trigger_frac=0.25, attack_steps=4)
    zp, zs = Zoo(str(tiny_vision), plain, root=tmp_path / "zoo"), Zoo(str(tiny_vision), strong, root=tmp_path / "zoo")
    assert zs.dir != zp.dir and zs.clean_dir == zp.dir == zp.clean_dir
    clean = zs.build("digits", None)
    assert clean == zp.path("digits", None) and zp.build("digits", None) == clean
    assert json.loads((clean / "safemerge.json").read_text())["asr_trigger"] == "badnets"
    bd = zs.build("digits", "badnets")
    assert bd.parent.parent == zs.dir and not zp.path("digits", "badnets").exists()
    assert {p.name for p in (tmp_path / "zoo").iterdir()} == {zp.dir.name, zs.dir.name}


def test_bench_methods_option_runs_a_subset_of_rows():
    from safemerge.bench.suites import only_methods

    s = only_methods(get_suite("vision-quick"), ["ties", "task_arithmetic"])
    assert [m[0] for m in s.methods] == ["task_arithmetic", "ties"]
    assert all(st.methods is None or set(st.methods) <= {"task_arithmetic", "ties"} for st in s.settings)
    with pytest.raises(SafeMergeError, match="unknown 'tie'"):
        only_methods(get_suite("vision-core"), ["tie"])
    res = runner.invoke(app, ["bench", "--suite", "vision-core", "--methods", "ties,dma"])
    assert res.exit_code == 2 and res.output.strip().startswith("error: --methods: unknown 'dma'"), res.output


def test_trigger_by_task_gives_each_backdoor_its_own_trigger(tiny_vision, tmp_path):
    """With `trigger_by_task`, two tasks' BadNets models carry patches at different places (different
    attackers), the clean models stay shared, and the recipe has its own zoo folder."""
    from safemerge.bench.attacks import RARE_WORDS, trigger_variant

    plain = replace(SMALL, steps=2)
    zoo = Zoo(str(tiny_vision), replace(plain, trigger_by_task=True), root=tmp_path / "zoo")
    assert zoo.clean_dir == Zoo(str(tiny_vision), plain, root=tmp_path / "zoo").dir != zoo.dir
    pos = {t: json.loads((zoo.build(t, "badnets") / "safemerge.json").read_text())["attack_params"]["position"]
           for t in ("mnist", "digits")}
    assert pos["mnist"] != pos["digits"]
    from safemerge.bench.zoo import attack_of

    x = torch.zeros(1, 3, 28, 28, dtype=torch.uint8)
    marks = [attack_of(json.loads((zoo.path(t, "badnets") / "safemerge.json").read_text())).apply(x) > 0
             for t in ("mnist", "digits")]
    assert marks[0].any() and marks[1].any() and not (marks[0] & marks[1]).any()
    # the suite's evaluator scores each trigger on its own (not the first one cached for the attack's name)
    from safemerge.bench.suites import PoolEvaluator

    ev, zm = PoolEvaluator(zoo), zoo.load("mnist", "badnets")
    asr = [ev.evaluate(zm.encoder_state, zm.heads["mnist"], "mnist", attack_of(zoo.load(t, "badnets").manifest))[1]
           for t in ("mnist", "digits")]
    assert len(ev._triggered) == 2 and asr[0] == acc_asr_direct(zoo, zm, "mnist")
    assert trigger_variant("rare_word", 1) == {"trigger_word": RARE_WORDS[1]} and trigger_variant("trojvit", 1) == {}


def acc_asr_direct(zoo, zm, task):
    """ASR of a zoo model on its own trigger, scored without the suite's evaluator."""
    from safemerge.bench.zoo import attack_of
    from safemerge.evaluate import acc_asr

    return acc_asr(zoo.model(zm), zoo.encoder(), zoo.data(task).test, attack_of(zm.manifest))[1]


def test_bench_attack_option_plants_one_attack_everywhere():
    from safemerge.bench.suites import with_attack

    s = with_attack(get_suite("text-core"), "rare_word")
    assert all(set(st.backdoored.values()) == {"rare_word"} for st in s.settings)
    assert [list(st.backdoored) for st in s.settings] == [list(st.backdoored) for st in get_suite("text-core").settings]
    with pytest.raises(SafeMergeError, match="unknown text attack 'badnets'"):
        with_attack(get_suite("text-core"), "badnets")
    res = runner.invoke(app, ["bench", "--suite", "vision-core", "--attack", "badnet"])
    assert res.exit_code == 2 and "--attack: unknown vision attack 'badnet'" in res.output, res.output
