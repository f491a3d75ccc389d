"""Profile files: round trip, validation (a corrupt profile is a clear VeridraftError, never a
silent fallback), lookup order ($VERIDRAFT_HOME/profiles first, then the shipped ones), matching
the model's weights and precision, and the shipped profiles themselves."""

import json
import warnings

import pytest

from veridraft import VeridraftError
from veridraft.drafters import make_drafter
from veridraft.models.base import Skip
from veridraft.profiles import (
    SHIPPED_DIR,
    Profile,
    file_name,
    find_profile_path,
    from_dict,
    load_profile,
    profile_for,
    save_profile,
)


class Cfg:
    def __init__(self, n):
        self.n_layers = n


class Net:
    def __init__(self, n):
        self.config = Cfg(n)


class Model:
    """A LoadedModel stand-in for lookups: name, precision, net.config.n_layers, path."""

    def __init__(self, name, n=4, precision="fp32", path=None):
        self.name, self.precision, self.net, self.path = name, precision, Net(n), path


def make(name="toy", n=4, precision="fp32", attn=(1, 2), mlp=(2,), gamma=0.55, k=7, sha=None):
    return Profile(
        model=name,
        n_layers=n,
        precision=precision,
        skip=Skip(attn=frozenset(attn), mlp=frozenset(mlp)),
        gamma=gamma,
        num_tokens=k,
        source_sha256=sha,
        architecture="llama",
        figures={"speedup": 1.23, "tau": 2.5},
        search={"trials": 10},
        machine={"cpu": "x", "threads": 2},
        date="2026-11-22T00:00:00+00:00",
        command="veridraft tune layerskip --model toy",
    )


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("VERIDRAFT_HOME", str(h))
    return h


def test_round_trip(tmp_path):
    p = make()
    path = save_profile(p, tmp_path / "a" / "x.json")
    q = load_profile(path)
    assert q.path == path
    q.path = None
    assert q == p
    assert json.loads(path.read_text())["format"] == "veridraft-profile/1"
    assert list(tmp_path.joinpath("a").iterdir()) == [path]  # no temporary file left


@pytest.mark.parametrize(
    "change, msg",
    [
        (lambda d: d.pop("format"), "format must be"),
        (lambda d: d.update(method="ngram"), "method must be"),
        (lambda d: d["model"].update(n_layers=0), "n_layers must be a positive"),
        (lambda d: d["model"].update(source_sha256="abc"), "64 hex digits"),
        (lambda d: d.update(precision=""), "precision must be"),
        (lambda d: d["skip"].update(attn=[1, 9]), r"names layers \[9\] outside 0..3"),
        (lambda d: d["skip"].update(mlp="1-2"), "skip.mlp must be a list"),
        (lambda d: d["skip"].update(attn=[1, 1]), "repeats a layer"),
        (lambda d: d["skip"].pop("mlp"), "exactly 'attn' and 'mlp'"),
        (lambda d: d.update(skip={"attn": [0, 1, 2, 3], "mlp": [0, 1, 2, 3]}), "every layer"),
        (lambda d: d["drafter"].update(gamma=1.5), r"gamma must be a number in \[0, 1\]"),
        (lambda d: d["drafter"].update(gamma=True), "gamma must be"),
        (lambda d: d["drafter"].update(num_tokens=0), "num_tokens must be a positive"),
        (lambda d: d.pop("drafter"), "missing the drafter"),
        (lambda d: d.update(figures=[]), "figures must be an object"),
    ],
)
def test_invalid_profiles_are_clear_errors(change, msg):
    d = make().to_dict()
    change(d)
    with pytest.raises(VeridraftError, match=msg) as e:
        from_dict(d, "P.json")
    assert "P.json" in str(e.value)


def test_corrupt_file_is_an_error_not_a_fallback(home):
    d = home / "profiles"
    d.mkdir(parents=True)
    bad = d / file_name("smollm2-135m", "fp32")
    bad.write_text('{"format": "veridraft-profile/1", "skip": ')
    with pytest.raises(
        VeridraftError, match=r"layerskip\.smollm2-135m\.fp32\.json: not valid JSON"
    ):
        profile_for(Model("smollm2-135m", n=30))
    # and the drafter does not silently fall back to the hand-picked set either
    with pytest.raises(VeridraftError, match="invalid layerskip profile"):
        make_drafter("layerskip", Model("smollm2-135m", n=30))
    bad.write_text("[]")
    with pytest.raises(VeridraftError, match="expected a JSON object"):
        profile_for(Model("smollm2-135m", n=30))


def test_profile_for_other_weights_is_an_error(home, tmp_path):
    save_profile(make(n=6), home / "profiles" / file_name("toy", "fp32"))
    with pytest.raises(VeridraftError, match="6-layer model, but toy has 4"):
        profile_for(Model("toy", n=4))
    save_profile(make(sha="a" * 64), home / "profiles" / file_name("toy", "fp32"))
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "veridraft.json").write_text(json.dumps({"source_sha256": "b" * 64}))
    with pytest.raises(VeridraftError, match="sha256 aaaaaaaaaaaa"):
        profile_for(Model("toy", path=folder))
    (folder / "veridraft.json").write_text(json.dumps({"source_sha256": "a" * 64}))
    assert profile_for(Model("toy", path=folder)).source_sha256 == "a" * 64


def test_file_name_must_match_its_content(home):
    save_profile(make(name="other"), home / "profiles" / file_name("toy", "fp32"))
    with pytest.raises(VeridraftError, match="named for toy but holds a profile for other"):
        profile_for(Model("toy"))


def test_lookup_order_home_first_then_shipped(home, monkeypatch, tmp_path):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr("veridraft.profiles.SHIPPED_DIR", shipped)
    assert profile_for(Model("toy")) is None  # nothing anywhere: no profile
    save_profile(make(attn=(3,)), shipped / file_name("toy", "fp32"))
    assert profile_for(Model("toy")).skip.attn == {3}
    save_profile(make(attn=(0,)), home / "profiles" / file_name("toy", "fp32"))
    p = profile_for(Model("toy"))
    assert p.skip.attn == {0} and p.path.parent == home / "profiles"
    # exact precision first, wherever it is; another precision only as a last resort
    save_profile(make(attn=(2,), precision="fp16w"), shipped / file_name("toy", "fp16w"))
    assert profile_for(Model("toy", precision="fp16w")).skip.attn == {2}
    p = profile_for(Model("toy", precision="int8"))
    assert p.precision in ("fp32", "fp16w") and p.path.parent == home / "profiles"
    # a longer model name sharing the prefix is not picked up
    assert find_profile_path("to", "fp32") is None
    save_profile(make(name="toy.v2"), home / "profiles" / file_name("toy.v2", "fp32"))
    assert find_profile_path("toy", "bf16")[0].name == "layerskip.toy.fp32.json"


def test_explicit_profile_and_none(home, tmp_path):
    path = save_profile(make(attn=(3,)), tmp_path / "mine.json")
    assert profile_for(Model("anything"), str(path)).skip.attn == {3}
    save_profile(make(), home / "profiles" / file_name("toy", "fp32"))
    assert profile_for(Model("toy"), "none") is None
    with pytest.raises(VeridraftError, match="not found"):
        profile_for(Model("toy"), str(tmp_path / "missing.json"))


def test_drafter_uses_the_profile(home):
    save_profile(
        make(attn=(1,), mlp=(3,), gamma=0.42, k=5), home / "profiles" / file_name("toy", "fp32")
    )
    m = Model("toy")
    d = make_drafter("layerskip", m)
    assert d.skip == Skip(attn={1}, mlp={3}) and d.gamma == 0.42 and d.num_tokens == 5
    assert "profile" in d.note
    d = make_drafter("layerskip:num_tokens=3", m)  # explicit options still win
    assert d.num_tokens == 3 and d.gamma == 0.42
    d = make_drafter("layerskip:attn=2", m)  # an explicit skip set ignores the profile
    assert d.skip == Skip(attn={2}) and d.gamma == 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = make_drafter("layerskip:profile=none", m)
    assert d.skip != Skip(attn={1}, mlp={3})


LAYERS = {"smollm2-135m": 30, "gemma3-270m": 18, "qwen2.5-coder-1.5b": 28}


@pytest.mark.parametrize("path", sorted(SHIPPED_DIR.glob("layerskip.*.json")), ids=lambda p: p.name)
def test_shipped_profiles_are_valid(path):
    p = load_profile(path)
    assert path.name == file_name(p.model, p.precision)  # found under the name it is looked up by
    assert p.n_layers == LAYERS[p.model]
    assert p.skip.attn or p.skip.mlp
    assert p.command.startswith("veridraft tune layerskip")
    assert p.machine.get("cpu") and p.date and p.figures.get("speedup")
    assert p.source_sha256 and len(p.source_sha256) == 64
