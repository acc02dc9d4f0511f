"""The one registry: every entry's options model mirrors what its callable takes (names and defaults), configs
are checked against it when they are read, and `safemerge methods` prints it."""

import inspect
import json

import pytest
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.config import MergeConfig, load_config
from safemerge.errors import SafeMergeError
from safemerge.merging import pool, registry
from safemerge.merging.concrete import concrete_adamerging, concrete_merge, concrete_task_arithmetic, dam
from safemerge.safety import defenses

# the functions whose keyword parameters an entry's options end up in, outermost first
CHAINS = {
    "fisher": [pool._fisher], "regmean": [pool._regmean], "adamerging_task": [pool._am_task],
    "adamerging_layer": [pool._am_layer], "concrete_ta": [pool._concrete_ta, concrete_task_arithmetic, concrete_merge],
    "concrete_am_task": [concrete_adamerging, concrete_merge], "concrete_am_layer": [concrete_adamerging, concrete_merge],
    "dam": [dam, concrete_merge], "awm": [defenses.awm], "sau": [defenses.sau], "anp": [defenses.anp],
}
# fixed by the wrapper (passing them would collide or change the method)
FIXED = {"concrete_ta": {"fixed_lambda", "mask_steps", "adamerging_steps"}, "concrete_am_task": {"granularity"},
         "concrete_am_layer": {"granularity"}}


def _params(fn) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(fn).parameters.items() if p.kind != p.VAR_KEYWORD}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_options_mirror_the_callables(name):
    entry = registry.get(name)
    for field, info in entry.options.model_fields.items():
        owner = next((fn for fn in CHAINS[name] if field in _params(fn)), None)
        assert owner is not None, f"{name}: option '{field}' is taken by none of {CHAINS[name]}"
        assert field not in FIXED.get(name, set())
        assert _params(owner)[field].default == info.default, (name, field)


def test_every_kind_is_registered_once_and_validated():
    kinds = {e.kind for e in registry.entries()}
    assert kinds == {"merge", "data_driven", "defense"}
    assert {"ties", "slerp", "dam", "concrete_ta", "awm"} <= set(registry.names())
    # concrete_ta: scaling is accepted (it used to be rejected), mask_steps refused (it used to crash)
    assert registry.validate("concrete_ta", {"scaling": 0.5, "steps": 3}).kwargs()["scaling"] == 0.5
    with pytest.raises(SafeMergeError, match="data-driven|merge method 'concrete_ta' has no parameter 'mask_steps'"):
        registry.validate("concrete_ta", {"mask_steps": 3})
    with pytest.raises(SafeMergeError, match="defense 'awm': parameter 'granularity'"):
        registry.validate("awm", {"granularity": "column"})
    with pytest.raises(SafeMergeError, match="unknown defense 'fp'"):
        registry.get("fp", "defense")
    assert pool.pool_method_params("dam")["lambda_adv"] == 0.1
    assert defenses.defense_params("anp")["neurons"] == "mlp+attn"


def test_merge_config_is_checked_when_read(tmp_path):
    good = {"base_model": "vision", "models": [{"path": "a"}, {"path": "b"}], "output": "o", "method": "ties",
            "parameters": {"density": [0.2, 0.3]}}
    assert MergeConfig.model_validate(good).method == "ties"
    assert MergeConfig.model_validate({**good, "method": "dam", "parameters": {"lambda_adv": 0.2}}).method == "dam"
    for change, pattern in [({"method": "tie"}, "unknown merge method 'tie'"),
                            ({"parameters": {"lambda": 1}}, "no parameter 'lambda'"),
                            ({"parameters": {"density": [0.2]}}, "'density' has 1 values for 2 models"),
                            ({"method": "dam", "streaming": True}, "needs heads and unlabeled inputs"),
                            ({"method": "slerp", "parameters": {}}, "exactly 1 model")]:
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(SafeMergeError, match=pattern) as e:
            load_config(path, MergeConfig)
        assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


def test_methods_command_prints_the_registry():
    res = CliRunner().invoke(app, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.output)
    assert table["ties"]["kind"] == "merge" and table["ties"]["options"]["trim"]["default"] == "'global'"
    assert table["dam"]["kind"] == "data_driven" and table["sau"]["kind"] == "defense"
    res = CliRunner().invoke(app, ["methods", "--kind", "merge"])
    assert res.exit_code == 0 and "model_stock" in res.output and "anp" not in res.output
